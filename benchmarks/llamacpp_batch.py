"""8 sequences decoded together by the llama.cpp worker under one sidecar, against 8 separate runs.

One command::

    python benchmarks/llamacpp_batch.py [--sequences 8] [--new-tokens 32] [--threads 2] [--out benchmarks/results]

Each sequence is a different pass-key prompt (~300-600 tokens), streamed in 64-token chunks under
a Nexus budget of 96 (slack 15, a call every 16 decode steps) with a ``nexus-sidecar serve``
subprocess (memory store, loopback) making every decision:

* ``together``: one llama.cpp context with ``n_seq`` = 8, one ``llama_decode`` per step for all
  sequences, one ``StepBatch`` per policy call for every sequence with a call due;
* ``separate``: the same prompts one after the other, each alone in a 1-sequence context.

Reported: wall seconds, tokens decoded per second (prompt + generated), policy calls (RPCs), the
largest KV cache per sequence read from llama.cpp, and whether every sequence's answer and
evictions equal its separate run (the summaries' largest difference too). Writes
``llamacpp_batch.json`` and ``.md``. The machine may be shared: one run, medians where repeated.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

FILLERS = ["The grass is green. The sky is blue. The sun is yellow. ", "Here we go. There and back again. ",
           "Rivers run to the sea and the sea is never full. ", "A stitch in time saves nine. ",
           "The train leaves at noon and the station is quiet. ", "Bread is baked early in the village. ",
           "The library opens at nine and closes at five. ", "Clouds gather over the hills in the evening. "]


def prompt(i: int) -> str:
    key = 1000 + 7919 * (i + 1) % 9000
    filler = FILLERS[i % len(FILLERS)]
    reps = 10 + 3 * i
    before = reps // 3
    return (filler * before + f"The secret pass key is {key}. Remember it. {key} is the pass key. "
            + filler * (reps - before) + "What is the secret pass key? The pass key is")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    import torch
    from nexus_client.hf.remote import RemoteBackend
    from nexus_client.llamacpp import LlamaModel, LlamaWorker, context_cells, resolve_gguf
    from nexus_sidecar.bench.procs import sidecar_process

    n, chunk, every = args.sequences, 64, 16
    cfg = dict(policy="nexus", budget=96, slack=every - 1, sinks=4, recent=16, groups=1, seed=0)
    path = resolve_gguf("smollm2")
    with LlamaModel(path, n_ctx=256, n_batch=8, capture=False) as probe:
        prompts = [probe.tokenize(prompt(i)) for i in range(n)]
    longest = max(len(p) for p in prompts)

    cpu: dict[str, float] = {"together": 0.0, "separate": 0.0}

    def run(worker: LlamaWorker, batch: list[list[int]], label: str) -> tuple[float, list[Any]]:
        t0, c0 = time.perf_counter(), time.process_time()
        res = worker.generate(batch, args.new_tokens, stop_at_eos=False)
        cpu[label] += time.process_time() - c0
        return time.perf_counter() - t0, res

    rows: dict[str, Any] = {}
    with sidecar_process("--store", "memory", "--device", "cpu") as proc, \
            RemoteBackend(proc.target, session_prefix="llamacpp-batch") as remote:
        cells = context_cells(n, longest, args.new_tokens, cfg["budget"], cfg["slack"], chunk, every)
        with LlamaModel(path, n_ctx=cells, n_seq=n, n_batch=n * chunk, threads=args.threads) as lm:
            worker = LlamaWorker(lm, remote, cfg, every_k=every, chunk_size=chunk, keep_summaries=True)
            calls0 = remote.calls
            secs, together = run(worker, prompts, "together")
            rows["together"] = {"seconds": secs, "rpcs": remote.calls - calls0, "decodes": worker.stats.decodes,
                                "tokens": worker.stats.tokens, "seq_per_call_max": max(worker.stats.sequences_per_call)}
        alone = []
        secs_alone = 0.0
        calls0 = remote.calls
        decodes = tokens = 0
        cells1 = context_cells(1, longest, args.new_tokens, cfg["budget"], cfg["slack"], chunk, every)
        with LlamaModel(path, n_ctx=cells1, n_seq=1, n_batch=chunk, threads=args.threads) as lm1:
            w1 = LlamaWorker(lm1, remote, cfg, every_k=every, chunk_size=chunk, keep_summaries=True)
            for p in prompts:
                s, [r] = run(w1, [p], "separate")
                secs_alone += s
                alone.append(r)
                decodes += w1.stats.decodes
                tokens += w1.stats.tokens
        rows["separate"] = {"seconds": secs_alone, "rpcs": remote.calls - calls0, "decodes": decodes, "tokens": tokens,
                            "seq_per_call_max": 1}
    same_tokens = sum(t.token_ids == a.token_ids for t, a in zip(together, alone, strict=True))
    same_answer = sum(t.text.split(".")[0] == a.text.split(".")[0] for t, a in zip(together, alone, strict=True))
    overlap = union = 0
    diff = 0.0
    for t, a in zip(together, alone, strict=True):
        diverged = False
        for st, sa, et, ea in zip(t.summaries, a.summaries, t.evictions, a.evictions, strict=False):
            if not diverged and st.attn.shape == sa.attn.shape:  # same slots so far
                diff = max(diff, float((st.attn - sa.attn).abs().max() / sa.attn.abs().max()))
            gt, ga = set(et.positions[0]), set(ea.positions[0])
            overlap += len(gt & ga)
            union += len(gt | ga)
            diverged = diverged or gt != ga
    for label, r in rows.items():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["cpu_seconds"] = cpu[label]
        r["tokens_per_cpu_s"] = r["tokens"] / cpu[label]
    out = {
        "machine": f"{platform.machine()} {platform.processor() or ''} threads={args.threads} (shared 2-core box)",
        "python": sys.version.split()[0], "torch": torch.__version__,
        "sequences": n, "new_tokens": args.new_tokens, "prompt_tokens": [len(p) for p in prompts],
        "policy": cfg, "chunk": chunk, "rows": rows,
        "speedup_tokens_per_s": rows["together"]["tokens_per_s"] / rows["separate"]["tokens_per_s"],
        "speedup_tokens_per_cpu_s": rows["together"]["tokens_per_cpu_s"] / rows["separate"]["tokens_per_cpu_s"],
        "answers_token_identical": same_tokens, "answers_same_key_text": same_answer,
        "evicted_positions_overlap": overlap / max(union, 1), "summary_attn_max_rel_diff_before_divergence": diff,
        "engine_cells_max": [r.engine_cells_max for r in together],
        "answers": [t.text for t in together],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp_batch.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [f"# llama.cpp worker: {n} sequences together vs separately (one sidecar)\n",
          f"{out['machine']}; prompts {min(out['prompt_tokens'])}-{max(out['prompt_tokens'])} tokens, "
          f"{args.new_tokens} new tokens each, Nexus budget 96 + slack 15, chunk 64, a call every 16 steps.\n",
          "| run | wall s | tokens/s (wall) | worker CPU s | tokens/CPU s | llama_decode calls | policy RPCs | "
          "sequences per RPC (max) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['cpu_seconds']:.1f} | "
                  f"{r['tokens_per_cpu_s']:.0f} | {r['decodes']} | {r['rpcs']} | {r['seq_per_call_max']} |")
    md.append(f"\ntogether / separate: {out['speedup_tokens_per_s']:.2f}x tokens/s (wall), "
              f"{out['speedup_tokens_per_cpu_s']:.2f}x tokens per worker CPU second; answers identical to the "
              f"separate runs token for token: {same_tokens}/{n}, up to the first period (the pass key): "
              f"{same_answer}/{n}; evicted positions overlap (intersection / union): {overlap / max(union, 1):.3f}; "
              f"largest relative |attn| difference of a summary while the slots agree: {diff:.1e}; engine cache "
              f"per sequence at most {max(out['engine_cells_max'])} cells (read from llama.cpp).\n")
    (args.out / "llamacpp_batch.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
