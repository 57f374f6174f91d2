"""Wall and CPU seconds of one evaluation run on each engine, same sample, same settings, same process.

One command::

    python benchmarks/llamacpp_speed.py [--samples 1] [--tasks passkey] [--length 2048] [--threads 1] \
        [--weights f16] [--pipeline]

Runs the evaluation's ``streaming`` Nexus run (compression 0.8, 64-token chunks) and its ``dense``
run of the same test samples on transformers (:func:`nexus_sidecar.evals.driver.drive`, the model's
sdpa with query recording) and on llama.cpp (:func:`nexus_sidecar.evals.llamacpp_driver.drive_llamacpp`),
interleaved, one thread each, and reports per run the wall seconds and the process CPU seconds
(``time.process_time``). On a shared machine the wall time depends on the neighbours; the CPU time
of a single-threaded run is the fairer comparison, so both are written. ``--weights``: the GGUF
llama.cpp runs (``resolve_gguf``); ``--pipeline``: both engines' streaming calls pipelined. The
JSON records llama.cpp's own build line (``llama_print_system_info``: which SIMD paths it has).
Writes ``llamacpp_speed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--tasks", default="passkey")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="f16, bf16, q8_0 or shipped (default: resolve_gguf's)")
    ap.add_argument("--pipeline", action="store_true", help="pipelined policy calls on both engines")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    import torch
    from nexus_client.hf import LocalBackend, load_model
    from nexus_client.llamacpp import LlamaModel, resolve_gguf
    from nexus_sidecar.evals.driver import drive
    from nexus_sidecar.evals.llamacpp_driver import drive_llamacpp
    from nexus_sidecar.evals.runner import prompt_segments
    from nexus_sidecar.evals.tasks import generate_sample

    torch.set_num_threads(args.threads)
    hf = load_model("smollm2")
    tok = hf.tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    samples = [generate_sample(t, args.length, "test", i, count) for i in range(args.samples)
               for t in args.tasks.split(",")]  # fmt: skip
    gguf = resolve_gguf("smollm2", args.weights)
    from nexus_client.llamacpp.library import llama

    system = llama().llama_print_system_info().decode().strip()
    lm = LlamaModel(gguf, n_ctx=args.length + 512, n_seq=2, n_batch=args.length + 512,
                    threads=args.threads)  # fmt: skip
    rows = []
    for s in samples:
        ctx, qs = prompt_segments(tok, s)
        stops = [tok.eos_token_id]
        budget = round(0.2 * len(ctx))
        cfg = {"policy": "nexus", "budget": budget, "slack": 0, "groups": 1, "sinks": 4, "recent": 16,
               "seed": zlib.crc32(s.sample_id.encode())}
        for engine in ("transformers", "llamacpp"):
            for setting in ("streaming", "dense"):
                backend = None if setting == "dense" else LocalBackend()
                c0, w0 = time.process_time(), time.perf_counter()
                if engine == "transformers":
                    res = drive(hf.model, tok, ctx, qs, s.max_new_tokens, setting=setting, backend=backend,
                                policy_config=None if backend is None else cfg, chunk_size=64, stop_ids=stops,
                                pipeline=args.pipeline)  # fmt: skip
                else:
                    res = drive_llamacpp(lm, tok, ctx, qs, s.max_new_tokens, setting=setting, backend=backend,
                                         policy_config=None if backend is None else cfg, chunk_size=64,
                                         stop_ids=stops, pipeline=args.pipeline)  # fmt: skip
                rows.append({"sample": s.sample_id, "engine": engine, "setting": setting, "context": len(ctx),
                             "wall_s": round(time.perf_counter() - w0, 2), "cpu_s": round(time.process_time() - c0, 2),
                             "answers": [a.text for a in res.answers], "peak_cache": res.peak_cache})
                print(rows[-1], flush=True)
    lm.close()
    summary = {}
    for setting in ("streaming", "dense"):
        per = {e: [r for r in rows if r["engine"] == e and r["setting"] == setting]
               for e in ("transformers", "llamacpp")}
        med = {e: {k: statistics.median(r[k] for r in v) for k in ("wall_s", "cpu_s")} for e, v in per.items()}
        summary[setting] = {**med, "cpu_speedup": med["transformers"]["cpu_s"] / med["llamacpp"]["cpu_s"],
                            "wall_speedup": med["transformers"]["wall_s"] / med["llamacpp"]["wall_s"]}
    out = {"machine": f"{platform.machine()} shared 2-core box, {args.threads} thread(s) per engine",
           "gguf": gguf.name, "llama_cpp_system": system, "pipeline": args.pipeline,
           "load_at_end": os.getloadavg(),
           "samples": [s.sample_id for s in samples], "rows": rows, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp_speed.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["| setting | transformers wall s | llama.cpp wall s | transformers CPU s | llama.cpp CPU s | "
          "CPU speed-up | wall speed-up |", "|---|---|---|---|---|---|---|"]
    for setting, v in summary.items():
        md.append(f"| {setting} | {v['transformers']['wall_s']:.1f} | {v['llamacpp']['wall_s']:.1f} | "
                  f"{v['transformers']['cpu_s']:.1f} | {v['llamacpp']['cpu_s']:.1f} | {v['cpu_speedup']:.2f}x | "
                  f"{v['wall_speedup']:.2f}x |")
    (args.out / "llamacpp_speed.md").write_text(f"{out['machine']}; samples {', '.join(out['samples'])}; "
                                                f"GGUF {gguf.name}; pipelined {args.pipeline}\n"
                                                f"llama.cpp: {system}\n\n"
                                                + "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
