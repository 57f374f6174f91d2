"""Blocking vs pipelined policy calls on the llama.cpp worker, against a sidecar whose answers are held.

One command::

    python benchmarks/llamacpp_pipeline.py [--sequences 1,4] [--delays-ms 0,50] [--new-tokens 32] [--threads 1]

Pass-key prompts (~300-600 tokens, :mod:`llamacpp_batch`'s), streamed in 64-token chunks under a
Nexus budget of 96 (slack 4, a call every 4 decode steps) with a ``nexus-sidecar serve`` subprocess
deciding behind a loopback proxy that holds every answer ``delay`` ms (``DelayProxy``: a slow
sidecar for real, not a mock). For each number of sequences decoded together and each delay, the
same prompts run blocking and pipelined (``LlamaWorker(pipeline=True)``: each answer applied right
before the sequences' next call). Reported: wall seconds, tokens per wall second, the seconds the
decode thread waited for answers, StepBatch RPCs, and the largest KV cache per sequence read from
llama.cpp against its bound (blocking ``budget + slack + k``, pipelined ``+ 2k``). Writes
``llamacpp_pipeline.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", default="1,4")
    ap.add_argument("--delays-ms", default="0,50")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="f16, bf16, q8_0 or shipped (default: resolve_gguf's)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    import torch
    from llamacpp_batch import prompt
    from nexus_client.hf.remote import RemoteBackend
    from nexus_client.llamacpp import LlamaModel, LlamaWorker, context_cells, resolve_gguf
    from nexus_sidecar.bench.delay_proxy import DelayProxy
    from nexus_sidecar.bench.procs import sidecar_process

    torch.set_num_threads(1)
    counts = [int(x) for x in args.sequences.split(",")]
    delays = [float(x) / 1000 for x in args.delays_ms.split(",")]
    chunk, every = 64, 4
    cfg = dict(policy="nexus", budget=96, slack=every, sinks=4, recent=16, groups=1, seed=0)
    path = resolve_gguf("smollm2", args.weights)
    with LlamaModel(path, n_ctx=256, n_batch=8, capture=False) as probe:
        prompts = [probe.tokenize(prompt(i)) for i in range(max(counts))]
    rows = []
    with sidecar_process("--store", "memory", "--device", "cpu", "--max-delay-us", "0") as proc:
        for n in counts:
            batch = prompts[:n]
            cells = context_cells(n, max(len(p) for p in batch), args.new_tokens, cfg["budget"], cfg["slack"], chunk,
                                  every, pipeline=True)  # fmt: skip
            with LlamaModel(path, n_ctx=cells, n_seq=n, n_batch=n * chunk, threads=args.threads) as lm:
                for delay in delays:
                    for pipeline in (False, True):
                        with DelayProxy(proc.target, delay) as proxy, \
                                RemoteBackend(proxy.target, session_prefix=f"pipe-{n}-{delay}-{pipeline}") as rb:
                            worker = LlamaWorker(lm, rb, cfg, every_k=every, chunk_size=chunk, pipeline=pipeline)
                            t0, c0 = time.perf_counter(), time.process_time()
                            res = worker.generate(batch, args.new_tokens, stop_at_eos=False)
                            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                        st = worker.stats
                        k = max(chunk, every)
                        rows.append({
                            "sequences": n, "delay_ms": delay * 1000, "pipelined": pipeline,
                            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "tokens": st.tokens,
                            "tokens_per_s": round(st.tokens / wall, 1), "waited_s": round(st.wait_s, 2),
                            "policy_s": round(st.policy_s, 2), "decode_s": round(st.decode_s, 2),
                            "rpcs": st.policy_calls, "max_cells": max(r.engine_cells_max for r in res),
                            "bound": cfg["budget"] + cfg["slack"] + (2 if pipeline else 1) * k,
                            "answers": [r.text.split(".")[0].strip() for r in res],
                        })  # fmt: skip
                        print(rows[-1], flush=True)
    out = {"machine": f"{platform.machine()} shared 2-core box, {args.threads} llama.cpp thread(s)",
           "gguf": path.name, "load_at_end": os.getloadavg(), "prompt_tokens": [len(p) for p in prompts],
           "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp_pipeline.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["| sequences | sidecar delay ms | calls | wall s | tokens/s | waited s | StepBatch RPCs | "
          "largest cache / bound |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['sequences']} | {r['delay_ms']:.0f} | {'pipelined' if r['pipelined'] else 'blocking'} | "
                  f"{r['wall_s']:.2f} | {r['tokens_per_s']:.0f} | {r['waited_s']:.2f} | {r['rpcs']} | "
                  f"{r['max_cells']} / {r['bound']} |")
    (args.out / "llamacpp_pipeline.md").write_text(f"{out['machine']}; GGUF {path.name}; prompts "
                                                   f"{out['prompt_tokens']} tokens\n\n" + "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
