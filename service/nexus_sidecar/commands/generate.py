"""``nexus-sidecar generate``: run a transformers causal LM with an eviction policy.

The policy runs in-process (the engine imported directly) unless ``--sidecar HOST:PORT`` (or
``unix:/path.sock``) names a running sidecar, which then makes every decision over gRPC. Prints
the generated text, a small table of the KV-cache size over time, the evictions made and, for a
sidecar, the bytes sent per policy call.
transformers and the integration are imported inside :func:`run` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` parser."""
    p = subparsers.add_parser(
        "generate",
        help="generate text with a HF causal LM under a KV-cache budget (in-process engine or a sidecar)",
        description="Greedy generation with a KV-cache eviction policy enforced during prefill and decode.",
    )
    p.add_argument("--engine", choices=["transformers", "llamacpp"], default="transformers",
                   help="inference engine: transformers (eager PyTorch loop) or llamacpp (llama.cpp's own engine "
                        "and KV cache via llama-cpp-python, the [llamacpp] extra; docs/llamacpp.md)")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (bundled GGUF, cached) or a local model dir (a .gguf file with --engine llamacpp)")
    p.add_argument("--policy", default="nexus", help="engine policy name (default: nexus)")
    p.add_argument("--budget", type=int, default=256, help="KV-cache budget in tokens")
    p.add_argument("--slack", type=int, default=0, help="evict only above budget + slack")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--recent", type=int, default=16)
    p.add_argument("--groups", choices=["shared", "layer"], default="shared", help="one eviction set or per layer")
    p.add_argument("--head-reduce", choices=["mean", "max"], default="mean")
    p.add_argument("--prompt-file", type=Path, help="prompt text file (default: read stdin)")
    p.add_argument("--prompt", help="prompt text (instead of --prompt-file)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--every", type=int, default=1, help="call the policy every K decode steps")
    p.add_argument("--chunk-size", type=int, default=256, help="prefill chunk size (budget enforced per chunk)")
    p.add_argument("--seed", type=int, default=0, help="policy seed (reservoir draws)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", choices=["f16", "bf16", "q8_0", "shipped"], default=None,
                   help="--engine llamacpp: the GGUF encoding llama.cpp runs (default f16 for smollm2, made once "
                        "from the shipped Q4_1 and cached; a .gguf path runs as shipped)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on the CPU: on a busy 2-core box a decode step took 4.6 s "
                        "with torch's default threads and 171 ms with one; default on CUDA: torch's choice)")
    p.add_argument("--sidecar", metavar="HOST:PORT",
                   help="make the decisions on this sidecar (host:port or unix:/path.sock) instead of in-process")
    p.add_argument("--api-key", help="API key for --sidecar (default: $NEXUS_API_KEY)")
    p.add_argument("--wire-dtype", choices=["fp32", "fp16"], default="fp32",
                   help="float type of the summaries sent to --sidecar (fp32 = same decisions as in-process)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-attempt deadline of a --sidecar call, seconds")
    p.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                   help="pipelined policy calls: send each call and keep decoding, apply its answer right before "
                        "the next call (the worker waits only when the sidecar is slower than --every steps; "
                        "the cache holds up to budget + slack + 2 x every between calls). Default: on with "
                        "--sidecar (measured: hides a 100 ms sidecar at --every 16, docs/worker.md), off in-process")
    p.set_defaults(func=run)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise SystemExit(f"generate: --prompt-file {args.prompt_file}: no such file")
        return args.prompt_file.read_text()
    if sys.stdin.isatty():
        raise SystemExit("generate: give --prompt, --prompt-file, or pipe the prompt on stdin")
    return sys.stdin.read()


def run(args: argparse.Namespace) -> int:
    """Load the model, generate, print text + cache table + evictions."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    import torch
    from nexus_client.errors import SidecarError
    from nexus_client.hf import LocalBackend, ModelResolutionError, generate, load_model
    from nexus_client.hf.remote import RemoteBackend

    if args.sidecar is None and (args.api_key is not None or args.wire_dtype != "fp32"):
        raise SystemExit("generate: --api-key and --wire-dtype only apply with --sidecar")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"generate: --threads {args.threads}: must be >= 1")
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    prompt = _read_prompt(args)
    if args.weights is not None and args.engine != "llamacpp":
        raise SystemExit("generate: --weights applies to --engine llamacpp only")
    if args.engine == "llamacpp":
        from nexus_sidecar.llamacpp_generate import run_llamacpp

        return run_llamacpp(args, prompt)
    try:
        loaded = load_model(args.model, device=args.device)
    except ModelResolutionError as exc:
        raise SystemExit(f"generate: {exc}; use --model smollm2 or a local transformers model directory") from None
    model, tok = loaded.model, loaded.tokenizer
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    groups = 1 if args.groups == "shared" else model.config.num_hidden_layers
    cfg = dict(policy=args.policy, budget=args.budget, slack=args.slack, sinks=args.sinks,
               recent=args.recent, groups=groups, seed=args.seed)  # fmt: skip
    remote: RemoteBackend | None = None
    if args.sidecar is not None:
        remote = RemoteBackend(args.sidecar, api_key=args.api_key or os.environ.get("NEXUS_API_KEY"),
                               float_dtype=torch.float16 if args.wire_dtype == "fp16" else torch.float32,
                               timeout_s=args.timeout)  # fmt: skip
    try:
        res = generate(
            model, tok, prompt, remote if remote is not None else LocalBackend(device=args.device), cfg,
            max_new_tokens=args.max_new_tokens, every_k=args.every, chunk_size=args.chunk_size,
            head_reduce=args.head_reduce, progress=args.max_new_tokens >= 32,
            pipeline=args.pipeline if args.pipeline is not None else remote is not None,
        )  # fmt: skip
    except SidecarError as exc:
        raise SystemExit(f"generate: sidecar {args.sidecar}: {exc}") from None
    finally:
        if remote is not None:
            remote.shutdown()
    print(res.text)
    print()
    print(f"prompt {res.prompt_tokens} tokens, generated {len(res.token_ids)}, policy calls {res.policy_calls}")
    # What the table means, printed with it: people read it without the source at hand.
    print(f"KV cache over time: 'step' is the decode step (negative steps -n..-1 are the prefill chunks of "
          f"{args.chunk_size} tokens), 'cache' the tokens held (largest layer) after it; the policy keeps it "
          f"at most budget {args.budget} + slack {args.slack} after each call, and with --every {args.every} up to "
          f"{args.every - 1} decoded tokens wait in between (pipelined: also the {args.every} decoded while a call "
          f"is in flight)")
    print(f"{'step':>6} {'cache':>6}")
    sizes = res.cache_sizes_over_time
    stride = max(1, -(-len(sizes) // 12))  # a small table: at most about a dozen rows
    for step, size in [*sizes[::stride], *([sizes[-1]] if sizes and (len(sizes) - 1) % stride else [])]:
        print(f"{step:>6} {size:>6}")
    total = sum(e.count for e in res.evictions)
    print(f"evictions: {len(res.evictions)} calls evicted {total} (group, position) pairs; each line below is one "
          "policy call: its phase, the step it ran at and the token positions it evicted")
    for e in res.evictions[:8]:
        shown = e.positions[0][:12]
        more = "" if len(e.positions[0]) <= 12 else f" ... (+{len(e.positions[0]) - 12})"
        print(f"  {e.phase:>7} step {e.step:>4}: {shown}{more}" + (" [group 0]" if groups > 1 else ""))
    if len(res.evictions) > 8:
        print(f"  ... {len(res.evictions) - 8} more calls")
    dec = res.timings["decode_steps"]
    if dec:
        dec_sorted = sorted(dec)
        print(f"prefill {res.timings['prefill_s']:.2f}s, decode step median {1000 * dec_sorted[len(dec) // 2]:.1f} ms")
    if remote is not None:
        decode = [r.bytes for r in remote.records if r.k <= args.every]
        per_decode = f", decode calls median {sorted(decode)[len(decode) // 2]} B" if decode else ""
        print(f"sidecar {args.sidecar} ({args.wire_dtype}): {remote.calls} policy calls, {remote.bytes_sent} bytes "
              f"sent, {remote.bytes_per_call:.0f} B/call{per_decode}")
    else:
        print(f"in-process engine: {res.policy_calls} policy calls")
    return 0
