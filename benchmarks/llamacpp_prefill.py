"""Prefill cost per CPU second: llama.cpp (flash attention on/off, graph capture on/off) vs transformers.

One command::

    python benchmarks/llamacpp_prefill.py [--tokens 1024] [--threads 1] [--out benchmarks/results]

SmolLM2-135M, one sequence, ``--tokens`` tokens: llama.cpp (the shipped Q4_1 GGUF) in one
``llama_decode`` and in 64-token chunks, in four configurations; transformers (float32, the model's
``sdpa``) in one forward. Reports process CPU seconds (the fair measure on a shared machine: one
thread each) and tokens per CPU second. Writes ``llamacpp_prefill.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    import torch
    from nexus_client.hf import load_model
    from nexus_client.llamacpp import LlamaModel, resolve_gguf

    n = args.tokens
    ids = list(range(1000, 1000 + n))
    rows = []
    for fa in (True, False):
        for cap in (False, True):
            with LlamaModel(resolve_gguf("smollm2"), n_ctx=n + 256, n_seq=1, n_batch=n, threads=args.threads,
                            flash_attn=fa, capture=cap) as lm:  # fmt: skip
                lm.decode(ids[:16], list(range(16)), [0] * 16)  # warm up
                lm.clear()
                c0 = time.process_time()
                lm.decode(ids, list(range(n)), [0] * n, [n - 1])
                one = time.process_time() - c0
                lm.clear()
                c0 = time.process_time()
                for i in range(0, n, 64):
                    lm.decode(ids[i : i + 64], list(range(i, min(i + 64, n))), [0] * len(ids[i : i + 64]))
                chunked = time.process_time() - c0
            rows.append({"engine": "llamacpp", "flash_attn": fa, "capture": cap, "one_shot_cpu_s": round(one, 2),
                         "chunked_64_cpu_s": round(chunked, 2), "tokens_per_cpu_s": round(n / one, 1)})
            print(rows[-1], flush=True)
    hf = load_model("smollm2")
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        hf.model(input_ids=torch.tensor([ids[:16]]))  # warm up
        c0 = time.process_time()
        hf.model(input_ids=torch.tensor([ids]))
        one = time.process_time() - c0
    rows.append({"engine": "transformers (float32, sdpa)", "one_shot_cpu_s": round(one, 2),
                 "tokens_per_cpu_s": round(n / one, 1)})
    print(rows[-1])
    out = {"machine": f"{platform.machine()} shared 2-core box, {args.threads} thread(s)", "tokens": n, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp_prefill.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["| engine | flash attention | capture | one-shot CPU s | 64-token chunks CPU s | tokens / CPU s |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['engine']} | {r.get('flash_attn', '-')} | {r.get('capture', '-')} | {r['one_shot_cpu_s']} | "
                  f"{r.get('chunked_64_cpu_s', '-')} | {r['tokens_per_cpu_s']} |")
    (args.out / "llamacpp_prefill.md").write_text(f"{out['machine']}, {n} tokens\n\n" + "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
