"""Worker cost of the query-agnostic priors (``nexus_client.hf.priors.cache_priors``) per policy call.

One command::

    python benchmarks/priors_cost.py [--out benchmarks/results] [--device cpu|cuda] [--repeats 30]

A ``DynamicCache`` of SmolLM2-135M's shapes (30 layers, 3 kv heads, head_dim 64, fp32 on CPU or
the model's dtype on CUDA) holding L = 400 and 2000 slots, random keys and values; rows: the median
time of one ``cache_priors`` call for a shared group (``groups=1``) and per-layer groups
(``groups=30``), and the bytes the three priors add to a ``SessionStep`` (fp32 and fp16 wire).
Writes ``priors_cost.json`` and ``priors_cost.md``. The machine may be shared: medians of one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from nexus_client.hf.priors import cache_priors
from nexus_client.wire import tensor_to_proto
from transformers import DynamicCache

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


def _cache(length: int, device: str, dtype: torch.dtype) -> DynamicCache:
    g = torch.Generator().manual_seed(length)
    cache = DynamicCache()
    for i in range(LAYERS):
        k = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=g).to(device, dtype)
        v = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=g).to(device, dtype)
        cache.update(k, v, i)
    return cache


def _time(fn, repeats: int, device: str) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    rows = []
    for length in (400, 2000):
        cache = _cache(length, args.device, dtype)
        for groups in (1, LAYERS):
            seconds = _time(lambda c=cache, g=groups: cache_priors(c, g), args.repeats, args.device)
            priors = cache_priors(cache, groups)
            wire = {name: sum(tensor_to_proto(t, d, field=n).ByteSize() for n, t in priors.items())
                    for name, d in (("fp32", torch.float32), ("fp16", torch.float16))}
            rows.append({"slots": length, "groups": groups, "ms": round(seconds * 1e3, 3),
                         "bytes_fp32": wire["fp32"], "bytes_fp16": wire["fp16"]})
            print(rows[-1], flush=True)
    meta = {"device": args.device, "dtype": str(dtype), "threads": args.threads, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "layers": LAYERS, "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("priors_cost" if args.device == "cpu" else f"priors_cost_{args.device}")
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# cache_priors cost per call ({args.device}, {dtype}, {args.threads} thread(s), SmolLM2-135M shapes)",
             "", "| slots L | groups | median ms | bytes fp32 | bytes fp16 |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['slots']} | {r['groups']} | {r['ms']} | {r['bytes_fp32']} | {r['bytes_fp16']} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
