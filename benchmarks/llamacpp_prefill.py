"""Prefill cost per CPU second: llama.cpp (flash attention on/off, graph capture on/off) vs transformers.

One command::

    python benchmarks/llamacpp_prefill.py [--tokens 1024] [--threads 1] [--weights shipped,q8_0,f16,bf16]

SmolLM2-135M, one sequence, ``--tokens`` tokens: llama.cpp in one ``llama_decode`` and in 64-token
chunks, for each GGUF encoding of ``--weights`` (the shipped Q4_1 and re-encodings of it,
``resolve_gguf``), flash attention on and off (on the shipped file), graph capture on and off;
transformers (float32, the model's ``sdpa``) in one forward. Reports process CPU seconds (the fair
measure on a shared machine: one thread each), tokens per CPU second and llama.cpp's build line
(``llama_print_system_info``). Writes ``llamacpp_prefill.json`` and ``.md``.
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
    ap.add_argument("--weights", default="shipped,q8_0,f16,bf16")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    import torch
    from nexus_client.hf import load_model
    from nexus_client.llamacpp import LlamaModel, resolve_gguf

    n = args.tokens
    ids = list(range(1000, 1000 + n))
    rows = []
    from nexus_client.llamacpp.library import llama

    system = llama().llama_print_system_info().decode().strip()
    configs = [(w, fa, cap) for w in args.weights.split(",") for fa in (True, False) for cap in (False, True)
               if fa or w == "shipped"]  # fmt: skip
    for weights, fa, cap in configs:
        with LlamaModel(resolve_gguf("smollm2", weights), n_ctx=n + 256, n_seq=1, n_batch=n, threads=args.threads,
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
        rows.append({"engine": f"llamacpp ({weights})", "flash_attn": fa, "capture": cap,
                     "one_shot_cpu_s": round(one, 2), "chunked_64_cpu_s": round(chunked, 2),
                     "tokens_per_cpu_s": round(n / one, 1)})
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
    out = {"machine": f"{platform.machine()} shared 2-core box, {args.threads} thread(s)", "tokens": n,
           "llama_cpp_system": system, "load_at_end": os.getloadavg(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "llamacpp_prefill.json").write_text(json.dumps(out, indent=1) + "\n")
    md = ["| engine | flash attention | capture | one-shot CPU s | 64-token chunks CPU s | tokens / CPU s |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['engine']} | {r.get('flash_attn', '-')} | {r.get('capture', '-')} | {r['one_shot_cpu_s']} | "
                  f"{r.get('chunked_64_cpu_s', '-')} | {r['tokens_per_cpu_s']} |")
    (args.out / "llamacpp_prefill.md").write_text(f"{out['machine']}, {n} tokens\nllama.cpp: {system}\n\n"
                                                  + "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
