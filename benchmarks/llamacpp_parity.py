"""llama.cpp vs transformers on the evaluation's samples: paired accuracy, what survived, wall time.

One command (after both evaluations ran, see docs/llamacpp.md)::

    python benchmarks/llamacpp_parity.py [--transformers benchmarks/results/eval-test-2048.jsonl]
        [--llamacpp benchmarks/results/eval-llamacpp-test-2048.jsonl] [--out benchmarks/results]

For every (policy, eviction, mode) the llama.cpp log holds, the samples both engines ran are paired:
mean score of each, the paired difference llama.cpp - transformers with a 95 % bootstrap CI
(``nexus_sidecar.evals.report.paired``), how often both scored the same, the answer tokens still
cached when the question came (``answer_kept``) on both, and the median wall seconds per run of each
engine (from the records; they ran at different times on a shared machine unless stated).
Writes ``llamacpp_parity.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transformers", type=Path, default=Path("benchmarks/results/eval-test-2048.jsonl"))
    ap.add_argument("--llamacpp", type=Path, default=Path("benchmarks/results/eval-llamacpp-test-2048.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    from nexus_sidecar.evals.report import paired

    hf = [r for r in _load(args.transformers) if r.get("engine", "transformers") == "transformers"]
    lc = [r for r in _load(args.llamacpp) if r.get("engine") == "llamacpp"]
    rows = []
    for key in sorted({(r["policy"], float(r["eviction"]), r["mode"]) for r in lc}):
        a = {r["sample_id"]: r for r in lc if (r["policy"], float(r["eviction"]), r["mode"]) == key}
        b = {r["sample_id"]: r for r in hf if (r["policy"], float(r["eviction"]), r["mode"]) == key}
        common = sorted(set(a) & set(b))
        if not common:
            continue
        runs = [{**a[s], "policy": "llamacpp"} for s in common] + [{**b[s], "policy": "transformers"} for s in common]
        d = paired(runs, ("llamacpp", key[1], key[2]), ("transformers", key[1], key[2]))
        kept = [(a[s]["answer_kept"], b[s]["answer_kept"]) for s in common
                if a[s].get("answer_kept") is not None and b[s].get("answer_kept") is not None]  # fmt: skip
        rows.append({
            "policy": key[0], "eviction": key[1], "mode": key[2], "n": len(common),
            "llamacpp": round(statistics.fmean(a[s]["score"] for s in common), 4),
            "transformers": round(statistics.fmean(b[s]["score"] for s in common), 4),
            "paired": d, "same_score": round(sum(a[s]["score"] == b[s]["score"] for s in common) / len(common), 3),
            "answer_kept_llamacpp": round(statistics.fmean(k[0] for k in kept), 4) if kept else None,
            "answer_kept_transformers": round(statistics.fmean(k[1] for k in kept), 4) if kept else None,
            "seconds_llamacpp": round(statistics.median(a[s]["seconds"] for s in common), 2),
            "seconds_transformers": round(statistics.median(b[s]["seconds"] for s in common), 2),
            "peak_cache_llamacpp": max(a[s]["peak_cache"] for s in common),
            "peak_cache_transformers": max(b[s]["peak_cache"] for s in common),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp_parity.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = ["| policy | compression | setting | n | llama.cpp | transformers | llama.cpp - transformers (paired) | "
          "same score | answer kept (l.cpp / tf) | s/run (l.cpp / tf, median) | peak cache (l.cpp / tf) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paired"]
        diff = f"{p['diff']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] ({p['wins']}/{p['losses']})"
        kept = "-" if r["answer_kept_llamacpp"] is None else \
            f"{r['answer_kept_llamacpp']:.3f} / {r['answer_kept_transformers']:.3f}"  # fmt: skip
        md.append(f"| {r['policy']} | {r['eviction']:g} | {r['mode']} | {r['n']} | {r['llamacpp']:.3f} | "
                  f"{r['transformers']:.3f} | {diff} | {r['same_score']:.2f} | {kept} | "
                  f"{r['seconds_llamacpp']:.1f} / {r['seconds_transformers']:.1f} | "
                  f"{r['peak_cache_llamacpp']} / {r['peak_cache_transformers']} |")
    (args.out / "llamacpp_parity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
