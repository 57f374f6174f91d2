"""``nexus-sidecar eval``: task accuracy of eviction policies against dense attention.

Runs RULER-style generated tasks (or a LongBench-format JSONL file) through a HF causal LM under
each policy, compression and setting (streaming / agnostic / aware / decode), resumably, and writes
``PATH`` (JSON list of records), ``PATH`` with ``.jsonl`` (one line per finished run, the resume
log), ``.md`` (tables + verdict), ``.png`` (accuracy vs eviction rate) and ``.meta.json`` (settings,
haystack fingerprints, the verdict). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

KVPRESS_POLICIES = (
    "kvpress:keydiff,kvpress:snapkv,kvpress:tova,kvpress:expected_attention,kvpress:knorm,kvpress:streaming_llm"
)
DEFAULT_POLICIES = "dense,streaming,tova,h2o,snapkv,random,keydiff,knorm,nexus_topk,nexus," + KVPRESS_POLICIES
DEFAULT_TASKS = "passkey,multikey,multivalue,multiquery,passkey-stdlib,multikey-stdlib"
QUICK_TASKS = "passkey,multiquery"
QUICK_POLICIES = "dense,tova,snapkv,keydiff,nexus,kvpress:keydiff,kvpress:snapkv"
MODE_HELP = (
    "settings, comma list (default streaming,agnostic,aware): streaming (context streamed in chunks, budget "
    "enforced after every chunk), agnostic (context prefilled then compressed once, then asked: kvpress's "
    "protocol), aware (context + question prefilled, compressed with the observation window), decode (as "
    "aware, and the budget also holds while the answer is written: one policy call per generated token), "
    "multiturn (one conversation per sample: context chunks and question turns interleaved in one stream under one "
    "budget, every answer decoded under it and kept in the stream; task turnkeys plants keys across chunks and asks "
    "about any earlier chunk; dense runs the same stream)"
)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` parser."""
    p = subparsers.add_parser(
        "eval",
        help="task accuracy of eviction policies vs dense attention (RULER-style tasks or LongBench JSONL)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled GGUF, cached) or a local model dir")
    p.add_argument("--engine", choices=["transformers", "llamacpp"], default="transformers",
                   help="inference engine: transformers, or llamacpp (llama.cpp's own engine and KV cache on the "
                        "model's GGUF, same token ids; engine policies and dense only, settings "
                        "streaming/agnostic/aware/decode; records carry an 'engine' field; docs/llamacpp.md)")
    p.add_argument("--weights", choices=["f16", "bf16", "q8_0", "shipped"], default=None,
                   help="--engine llamacpp: the GGUF encoding llama.cpp runs (default f16 for smollm2, made once "
                        "from the shipped Q4_1 and cached: the faster prefill; a .gguf path runs as shipped)")
    p.add_argument("--tasks", type=_names, default=None, help=f"comma list (default: {DEFAULT_TASKS})")
    p.add_argument("--lengths", type=_ints, default=None,
                   help="context lengths in tokens, comma list (default 2048; 512 with --quick)")  # fmt: skip
    p.add_argument("--policies", type=_names, default=None,
                   help=f"comma list (default: {DEFAULT_POLICIES}; with --quick {QUICK_POLICIES}); "
                        "knobs per policy as name:key=value, any PolicyConfig field, checked "
                        "before the model loads (e.g. nexus:pool=7:pool_reduce=mean, nexus:tau=inf); "
                        "kvpress:<press>[:field=value] runs kvpress's own press (keydiff, snapkv, tova, "
                        "expected_attention, knorm, streaming_llm, random; needs the [kvpress] extra); "
                        "kvpress:kvzip (KVzip, e.g. kvpress:kvzip:layerwise=true) is not a default: it re-runs "
                        "the model to reconstruct the context on its own prefill (~3x a prefill per run, measured "
                        "at 2k tokens), agnostic mode only")  # fmt: skip
    p.add_argument("--eviction", type=_floats, default=None,
                   help="compression ratios (fraction of KV pairs removed, kvpress's definition), comma list "
                        "(default 0.8)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=1,
                   help="runs of every sampled policy (nexus, random) with seeds 0..N-1 (labels gain :seed=i "
                        "for i > 0); the report adds mean +- std over the seeds (default 1)")
    p.add_argument("--modes", type=_names, default=["streaming", "agnostic", "aware"], help=MODE_HELP)
    p.add_argument("--window", type=int, default=32,
                   help="observation window of one-shot calls: attention is read over the last W prompt "
                        "queries (SnapKV's definition; default 32)")  # fmt: skip
    p.add_argument("--samples", type=int, default=None, help="samples per task (default 8; 2 with --quick)")
    p.add_argument("--start", type=int, default=0, help="index of the first sample (to extend a run)")
    p.add_argument("--split", choices=["dev", "test"], default="test", help="dev for tuning, test for reporting")
    p.add_argument("--quick", action="store_true",
                   help=f"2 samples of {QUICK_TASKS} at 512 tokens, compression 0.8, the --quick policies "
                        "(a few minutes)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=64, help="streaming mode: context chunk size (default 64)")
    p.add_argument("--pipeline", action="store_true",
                   help="streaming and decode modes: pipelined policy calls (each answer applied right before the "
                        "next call, the worker never waits; docs/worker.md); a separate run key")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--recent", type=int, default=16)
    p.add_argument("--knobs", default="", help="knobs for every policy, key=value:key=value (e.g. pool=3)")
    p.add_argument("--prompt", choices=["plain", "chat"], default="plain",
                   help="prompt format: plain (context, blank line, question, answer prefix; chosen on dev by "
                        "dense accuracy, see docs/evaluation.md) or the tokenizer's chat template")  # fmt: skip
    p.add_argument("--dataset-file", type=Path, help="LongBench-format JSONL (context, input, answers) instead")
    p.add_argument("--metric", default=None, help="--dataset-file metric: match_all, match_any, exact, f1, rouge_l")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length for --dataset-file")
    p.add_argument("--sidecar", default=None, help="ADDR of a running sidecar (remote backend) instead of in-process")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core box 2 threads ran 3-5x slower, measured)",
    )
    p.add_argument("--json", type=Path, required=True, help="output JSON path (siblings .jsonl/.md/.png/.meta.json)")
    p.add_argument(
        "--runs",
        type=Path,
        default=None,
        help="per-run resume log (default: the --json path with .jsonl); several reports may share one",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes: samples are dealt to N children (each loads the model and uses --threads "
        "threads), their run logs merged, then the reports written (default 1)",
    )
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # K/N: one child of --jobs
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="compute nothing: report the samples whose runs are all in the .jsonl (a partial run)",
    )
    p.set_defaults(func=run)


def backend_factory(args: argparse.Namespace) -> Any:
    """Build the function that makes the policy backend of each run, from the CLI arguments.

    In-process (:class:`nexus_client.hf.LocalBackend`, one engine shared by all runs) by default;
    ``--sidecar ADDR`` sends every policy call to a running sidecar through
    :class:`nexus_client.hf.remote.RemoteBackend` (one channel shared by all runs; the API key, if
    the sidecar wants one, comes from ``NEXUS_API_KEY``). Same seed, same numbers.
    """
    if args.sidecar:
        import os

        from nexus_client.errors import SidecarError
        from nexus_client.hf.remote import RemoteBackend

        remote = RemoteBackend(args.sidecar, api_key=os.environ.get("NEXUS_API_KEY"), timeout_s=60.0)
        try:
            remote.client.list_policies()  # fail fast on a bad address, before the model loads
        except SidecarError as exc:
            remote.shutdown()
            raise SystemExit(f"eval: cannot use the sidecar at --sidecar {args.sidecar}: {exc}") from None
        return lambda: remote
    from nexus_client.hf import LocalBackend

    from nexus_sidecar.engine import Engine

    engine = Engine(device=args.device)  # one engine, one session per run: sessions are closed after each
    return lambda: LocalBackend(engine=engine)


def _weights(args: argparse.Namespace) -> str | None:
    """The GGUF encoding a llama.cpp run uses (part of its run keys); None on transformers."""
    if args.engine != "llamacpp":
        return None
    from nexus_client.hf.models import MODEL_ALIASES
    from nexus_client.llamacpp.weights import DEFAULT_WEIGHTS

    return args.weights or (DEFAULT_WEIGHTS if args.model in MODEL_ALIASES else "shipped")


def _llamacpp_model(args: argparse.Namespace, samples: list[Any], count: Any) -> Any:
    """A llama.cpp context for the evaluation: 2 sequences (the context and a question branch), cells
    and batch for the longest sample's prompt + answer."""
    from nexus_client.llamacpp import LlamaCppMissing, LlamaModel, resolve_gguf

    if args.device != "cpu":
        raise SystemExit("eval: --engine llamacpp runs on the CPU build of llama.cpp (--device cpu)")
    longest = max(count(s.context) + max(count(q.question) + 16 for q in s.questions) + s.max_new_tokens
                  for s in samples)  # fmt: skip
    size = -(-(longest + 64) // 256) * 256
    try:
        return LlamaModel(resolve_gguf(args.model, args.weights), n_ctx=size, n_seq=2, n_batch=size,
                          threads=args.threads)  # fmt: skip
    except (LlamaCppMissing, FileNotFoundError) as exc:
        raise SystemExit(f"eval: {exc}") from None


def _shard_argv(args: argparse.Namespace, log: Path, k: int, n: int) -> list[str]:
    """The command line of shard ``k`` of ``n``: this run's resolved settings, plus ``--shard``."""
    argv = [sys.executable, "-m", "nexus_sidecar.cli", "eval", "--model", args.model, "--split", args.split,
            "--lengths", ",".join(map(str, args.lengths)), "--policies", ",".join(args.policies),
            "--eviction", ",".join(f"{e:g}" for e in args.eviction), "--modes", ",".join(args.modes),
            "--samples", str(args.samples), "--start", str(args.start), "--chunk-size", str(args.chunk_size),
            "--window", str(args.window), "--prompt", args.prompt, "--engine", args.engine,
            *(["--weights", args.weights] if args.weights else []),
            "--sinks", str(args.sinks), "--recent", str(args.recent), "--device", args.device,
            "--threads", str(args.threads), "--max-new-tokens", str(args.max_new_tokens),
            "--json", str(args.json), "--runs", str(log), "--shard", f"{k}/{n}", "--no-progress"]  # fmt: skip
    if args.pipeline:
        argv.append("--pipeline")
    if args.dataset_file is not None:
        argv += ["--dataset-file", str(args.dataset_file)]
    else:
        argv += ["--tasks", ",".join(args.tasks)]
    for flag, value in (("--knobs", args.knobs), ("--metric", args.metric), ("--sidecar", args.sidecar)):
        if value:
            argv += [flag, value]
    return argv


def _paths(json_path: Path) -> dict[str, Path]:
    stem = json_path.with_suffix("")
    return {k: Path(f"{stem}{ext}") for k, ext in
            (("jsonl", ".jsonl"), ("md", ".md"), ("png", ".png"), ("meta", ".meta.json"))}  # fmt: skip


def _samples(args: argparse.Namespace, count: Any) -> list[Any]:
    from nexus_sidecar.evals.longbench import load_longbench
    from nexus_sidecar.evals.tasks import generate_sample

    n = args.samples
    if args.dataset_file is not None:
        rows = load_longbench(args.dataset_file, args.metric, args.max_new_tokens)
        return rows[args.start : args.start + n] if n else rows[args.start :]
    tasks = args.tasks
    out = []
    multi = len(args.lengths) > 1
    for length in args.lengths:
        for i in range(args.start, args.start + n):  # sample-major: a partial run covers every task
            for t in tasks:
                s = generate_sample(t, length, args.split, i, count)
                out.append(dataclasses.replace(s, task=f"{t}@{length}") if multi else s)
    return out


def run(args: argparse.Namespace) -> int:
    """Run the evaluation and write the outputs."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    from nexus_sidecar.evals import report
    from nexus_sidecar.evals.haystacks import haystack_digest
    from nexus_sidecar.evals.runner import (
        EvalSettings,
        PolicySpec,
        check_knobs,
        expand_runs,
        iter_eval,
        knob_value,
        with_seeds,
    )
    from nexus_sidecar.evals.shards import Terminated, parse_shard, recover_shard_logs, run_shards, shard_log

    if args.tasks is None:
        args.tasks = _names(QUICK_TASKS if args.quick else DEFAULT_TASKS)
    if args.policies is None:
        args.policies = _names(QUICK_POLICIES if args.quick else DEFAULT_POLICIES)
    if args.eviction is None:
        args.eviction = [0.8]
    if args.lengths is None:
        args.lengths = [512] if args.quick else [2048]
    if args.samples is None:
        args.samples = 2 if args.quick else 8
    if "multiturn" in args.modes and args.prompt == "chat":
        raise SystemExit("eval: --modes multiturn streams plain-format turns; use --prompt plain")
    if args.samples < 1 or args.chunk_size < 1 or args.window < 1:
        raise SystemExit(f"eval: --samples, --chunk-size and --window must be >= 1, got {args.samples}, "
                         f"{args.chunk_size}, {args.window}")  # fmt: skip
    base: dict[str, Any] = {"sinks": args.sinks, "recent": args.recent}
    for part in filter(None, args.knobs.split(":")):
        key, sep, raw = part.partition("=")
        if not sep:
            raise SystemExit(f"eval: --knobs part {part!r} is not key=value")
        base[key] = knob_value(raw)
    try:
        check_knobs("nexus", base, "--knobs")
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        policies = with_seeds([PolicySpec.parse(p) for p in args.policies], args.seeds)
        args.policies = [p.label for p in policies]  # what --jobs children run
        runs = expand_runs(policies, args.eviction, args.modes)
        if args.weights is not None and args.engine != "llamacpp":
            raise ValueError("--weights applies to --engine llamacpp only")
        if args.engine == "llamacpp":
            from nexus_sidecar.evals.kvpress_baselines import is_kvpress

            bad = [p.label for p in policies if is_kvpress(p.name)]
            if bad:
                raise ValueError(f"--policies {','.join(bad)}: kvpress presses run on --engine transformers only")
            if "multiturn" in args.modes:
                raise ValueError("--modes multiturn: the multi-turn setting runs on --engine transformers only")
    except ValueError as exc:
        raise SystemExit(f"eval: {exc}") from None

    from nexus_sidecar.evals.tasks import parse_task

    try:
        for t in args.tasks if args.dataset_file is None else ():
            parse_task(t)
    except ValueError as exc:
        raise SystemExit(f"eval: {exc}") from None
    shard = None
    try:
        if args.shard is not None:
            shard = parse_shard(args.shard)
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    except ValueError as exc:
        raise SystemExit(f"eval: {exc}") from None
    paths = _paths(args.json)
    if args.runs is not None:
        paths["jsonl"] = args.runs
    if args.jobs > 1 and shard is None and not args.report_only:
        try:
            added = run_shards(lambda k, n: _shard_argv(args, paths["jsonl"], k, n), paths["jsonl"], args.jobs,
                               progress=not args.no_progress)  # fmt: skip
        except RuntimeError as exc:
            raise SystemExit(f"eval: {exc}") from None
        except Terminated as exc:
            print(f"eval: {exc}; the children were stopped and their finished runs merged into {paths['jsonl']} "
                  "(rerun the same command to resume)", file=sys.stderr)  # fmt: skip
            raise SystemExit(128 + exc.signum) from None
        print(f"eval: {args.jobs} shards added {added} runs to {paths['jsonl']}; writing the reports", file=sys.stderr)
        args.report_only = True  # every run is in the main log now
    if shard is None:
        recover_shard_logs(paths["jsonl"])  # what an interrupted --jobs run finished is reused, not redone
    factory = backend_factory(args)  # before the model loads: a bad --sidecar fails fast

    import torch
    from nexus_client.hf import load_model

    if args.threads >= 1:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model(args.model, device=args.device)
    tok = loaded.tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    try:
        samples = _samples(args, count)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"eval: {exc}") from None
    settings = EvalSettings(model=args.model, chunk_size=args.chunk_size, chat=args.prompt == "chat",
                            window=args.window, base_knobs=base, pipeline=args.pipeline,
                            engine=args.engine, weights=_weights(args))  # fmt: skip
    model = loaded.model
    if args.engine == "llamacpp":
        model = _llamacpp_model(args, samples, count)
    if shard is not None:  # a child of --jobs: its share of the samples, into its own log, no reports
        k, n = shard
        for _ in iter_eval(model, tok, samples[k::n], runs, settings, factory, shard_log(paths["jsonl"], k, n),
                           progress=False, known=[paths["jsonl"]]):  # fmt: skip
            pass
        return 0
    results = list(iter_eval(model, tok, samples, runs, settings, factory, paths["jsonl"],
                             progress=not args.no_progress, total=len(samples) * len(runs),
                             report_only=args.report_only))  # fmt: skip
    if not results:
        raise SystemExit(f"eval: no finished sample in {paths['jsonl']} (--report-only computes nothing)")
    records = report.aggregate(results)
    title = f"{args.model}, split {args.split}, lengths {','.join(map(str, args.lengths))}"
    nexus_labels = [p.label for p in policies if p.name == "nexus"] or ["nexus"]
    verdicts = {(lbl, ev): report.verdict(records, lbl, ev, results) for lbl in nexus_labels for ev in args.eviction}
    meta = {
        "command": " ".join(["nexus-sidecar", *sys.argv[1:]]) if sys.argv[0].endswith("nexus-sidecar") else None,
        "settings": dataclasses.asdict(settings),
        "split": args.split,
        "lengths": args.lengths,
        "tasks": sorted({s.task for s in samples}),
        "samples_per_task": {
            t: len({r["sample_id"] for r in results if r["task"] == t}) for t in sorted({r["task"] for r in results})
        },
        "report_only": args.report_only,
        "haystack_sha256_16": {h: haystack_digest(h) for h in ("noise", "stdlib")},
        "python": sys.version.split()[0],
        "model_source": loaded.source if args.engine == "transformers" else str(model.path),
        "engine": args.engine,
        "verdict": list(verdicts.values()),
        "agreement": [row for ev in args.eviction for row in report.agreement(results, ev)],
        "seeds": report.seed_spread(records),
        "per_turn": report.per_turn(results),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1) + "\n")
    paths["meta"].write_text(json.dumps(meta, indent=1, default=str) + "\n")
    md = report.markdown(records, title)
    md += "\n## verdict\n\n" + report.verdict_markdown(meta["verdict"])
    if meta["agreement"]:
        md += "\n## ours vs kvpress, same method\n\n" + report.agreement_markdown(meta["agreement"])
    if meta["per_turn"]:
        md += "\n## multiturn: " + report.per_turn_markdown(meta["per_turn"])
    if meta["seeds"]:
        md += "\n## sampled policies over seeds\n\n" + report.seed_spread_markdown(meta["seeds"])
    md += "\n<details><summary>verdict as JSON</summary>\n\n```json\n" + json.dumps(meta["verdict"], indent=1)
    md += "\n```\n\n</details>\n"
    paths["md"].write_text(md)
    report.plot(records, paths["png"], title)
    print(md)
    print(f"wrote {args.json}, {paths['md']}, {paths['png']}, {paths['meta']} (runs log {paths['jsonl']})")
    return 0
