"""``nexus-sidecar generate --engine llamacpp``: the same generation inside llama.cpp's own engine.

The prompt is tokenized by llama.cpp, decoded by ``llama_decode`` with the policy enforced all along
(the in-process engine or ``--sidecar``), and evictions are applied to llama.cpp's KV cache with
``llama_memory_seq_rm``. The summary line's cache size is read from llama.cpp (the cells it holds
for the sequence), not from the worker's bookkeeping.
"""

from __future__ import annotations

import argparse
import os


def run_llamacpp(args: argparse.Namespace, prompt: str) -> int:
    """Generate with llama.cpp; prints the answer, then the calls, evictions and engine cache size."""
    from nexus_client.errors import SidecarError
    from nexus_client.hf import LocalBackend
    from nexus_client.hf.remote import RemoteBackend
    from nexus_client.llamacpp import LlamaCppMissing, LlamaModel, LlamaWorker, context_cells, resolve_gguf

    if args.groups != "shared":
        raise SystemExit("generate: --groups layer is not possible with --engine llamacpp: llama_memory_seq_rm "
                         "removes a position from every layer of a sequence at once (see docs/llamacpp.md)")
    if args.device != "cpu":
        raise SystemExit("generate: --engine llamacpp runs on the CPU build of llama.cpp (--device cpu)")
    if args.chat:
        raise SystemExit("generate: --chat is not supported with --engine llamacpp (give the formatted prompt)")
    if args.chunk_size < 1 or args.every < 1 or args.max_new_tokens < 1:
        raise SystemExit("generate: --chunk-size, --every and --max-new-tokens must be >= 1")
    try:
        path = resolve_gguf(args.model, args.weights)
    except (FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"generate: {exc}") from None
    cfg = dict(policy=args.policy, budget=args.budget, slack=args.slack, sinks=args.sinks, recent=args.recent,
               groups=1, seed=args.seed)  # fmt: skip
    threads = args.threads or os.cpu_count() or 1
    try:
        probe = LlamaModel(path, n_ctx=256, n_batch=8, threads=threads, capture=False)
    except LlamaCppMissing as exc:
        raise SystemExit(f"generate: {exc}") from None
    ids = probe.tokenize(prompt)
    probe.close()
    remote_wanted = args.sidecar is not None
    pipeline = args.pipeline if args.pipeline is not None else remote_wanted  # as the transformers path
    cells = context_cells(1, len(ids), args.max_new_tokens, args.budget, args.slack, args.chunk_size, args.every,
                          pipeline=pipeline)  # fmt: skip
    model = LlamaModel(path, n_ctx=max(cells, 256), n_seq=1, n_batch=args.chunk_size, threads=threads)
    remote: RemoteBackend | None = None
    if args.sidecar is not None:
        import torch

        remote = RemoteBackend(args.sidecar, api_key=args.api_key or os.environ.get("NEXUS_API_KEY"),
                               float_dtype=torch.float16 if args.wire_dtype == "fp16" else torch.float32,
                               timeout_s=args.timeout)  # fmt: skip
    backend = remote if remote is not None else LocalBackend()
    try:
        worker = LlamaWorker(model, backend, cfg, every_k=args.every, chunk_size=args.chunk_size,
                             head_reduce=args.head_reduce, pipeline=pipeline)  # fmt: skip
        [res] = worker.generate([ids], args.max_new_tokens, progress=args.max_new_tokens >= 32)
    except SidecarError as exc:
        raise SystemExit(f"generate: sidecar {args.sidecar}: {exc}") from None
    except ValueError as exc:
        raise SystemExit(f"generate: {exc}") from None
    finally:
        if remote is not None:
            remote.shutdown()
        model.close()
    st = worker.stats
    print(res.text)
    print()
    k = max(args.chunk_size, args.every)
    bound = (f"budget {args.budget} + slack {args.slack} + 2 x chunk {k}, pipelined" if pipeline
             else f"budget {args.budget} + slack {args.slack} + chunk {k}")  # fmt: skip
    print(f"llama.cpp ({path.name}, {threads} threads): prompt {res.prompt_tokens} tokens, generated "
          f"{len(res.token_ids)}; policy calls {res.policy_calls}, tokens evicted {res.evicted}; engine KV cache "
          f"largest {res.engine_cells_max} cells (read from llama.cpp; bound {bound})")
    mode = f"pipelined, waited {st.wait_s:.2f}s" if pipeline else "blocking"
    print(f"time: {st.wall_s:.2f}s total, llama_decode {st.decode_s:.2f}s over {st.decodes} calls, summaries "
          f"{st.summary_s:.2f}s, policy {st.policy_s:.2f}s ({mode}), "
          f"surgery {st.surgery_s:.2f}s; worker key/value mirror {st.mirror_bytes_max / 2**20:.1f} MiB at most")
    if remote is not None:
        print(f"sidecar {args.sidecar} ({args.wire_dtype}): {remote.calls} policy calls, {remote.bytes_sent} bytes "
              f"sent, {remote.bytes_per_call:.0f} B/call")
    return 0
