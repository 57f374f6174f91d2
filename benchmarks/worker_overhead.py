"""Worker-side overhead of the eviction policy on SmolLM2-135M: decode-step time and bytes per call.

One command::

    python benchmarks/worker_overhead.py [--out benchmarks/results] [--prompt-tokens 300] [--new-tokens 64]

Rows (same ~300-token prompt, greedy, 64 new tokens, batch 1, CPU):

* ``dense``: plain transformers decoding (``DynamicCache``, the model's default attention), no policy;
* ``local k=1`` / ``local k=16``: :func:`nexus_client.hf.generate` with the engine in-process;
* ``remote k=1`` / ``remote k=16``: the same with :class:`~nexus_client.hf.remote.RemoteBackend`
  against a ``nexus-sidecar serve`` subprocess on a loopback port (memory store), fp32 summaries;
* ``remote fp16 k=1`` / ``k=16``: fp16 summaries (bytes per call; decisions may differ slightly).

For ``k=16`` the slack is ``k - 1`` so the calls really are 16 steps apart. Reported per row: the
median decode-step time (forward + capture + accumulation + any policy call and cache surgery), its
ratio to dense, the median policy-call time on the steps that made one, and the median serialized
``SessionStep`` size of the decode calls. Writes ``worker_overhead.json`` and ``worker_overhead.md``.
The machine may be shared: the numbers are medians of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time

import torch

TEXT = (
    "The archive holds the records of the northern survey. Each entry lists a station, the date of the "
    "measurement, the observer and the readings of wind, pressure and temperature. The secret code of the "
    "archive is 7215. Station records continue for many pages, and the observers changed every season. "
)


def machine() -> dict[str, Any]:
    """A short description of the host."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": mem_gb, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    """Exactly ``n`` token ids of a repetitive report-like text."""
    ids: list[int] = tokenizer(TEXT * (1 + n // 40), return_tensors="pt").input_ids[0].tolist()
    if len(ids) < n:
        raise RuntimeError(f"prompt text too short: {len(ids)} < {n} tokens")
    return ids[:n]


@torch.inference_mode()
def dense_steps(model: Any, ids: list[int], new_tokens: int) -> list[float]:
    """Per-step seconds of plain greedy decoding with a DynamicCache (prefill not timed)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    token = int(out.logits[0, -1].argmax())
    steps = []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        steps.append(time.perf_counter() - t0)
    return steps


def _median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def policy_row(name: str, model: Any, tok: Any, ids: list[int], backend: Any, k: int, budget: int,
               new_tokens: int, chunk: int) -> dict[str, Any]:
    """Run :func:`generate` once with this backend and summarise its decode steps."""
    from nexus_client.hf import generate

    cfg = dict(policy="nexus", budget=budget, slack=k - 1, sinks=4, recent=16, groups=1, seed=0)
    res = generate(model, tok, ids, backend, cfg, max_new_tokens=new_tokens, every_k=k, chunk_size=chunk,
                   stop_at_eos=False)
    t = res.timings
    calls = [p for p in t["policy_steps"] if p > 0]
    row: dict[str, Any] = {
        "name": name, "k": k, "decode_step_ms": _median_ms(t["decode_steps"]),
        "forward_ms": _median_ms(t["forward_steps"]), "policy_call_ms": _median_ms(calls),
        "decode_calls": len(calls), "policy_calls": res.policy_calls,
        "max_cache_after_call": res.max_cache_after_call, "evicted": sum(e.count for e in res.evictions),
        "steps": len(t["decode_steps"]),
    }
    records = getattr(backend, "records", None)
    if records is not None:
        decode = [r.bytes for r in records if r.k == k]
        row["bytes_per_decode_call"] = int(statistics.median(decode)) if decode else None
        row["bytes_per_call_all"] = round(backend.bytes_per_call)
    return row


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The results table."""
    dense = next(r["decode_step_ms"] for r in rows if r["name"] == "dense")
    lines = [
        f"SmolLM2-135M (fp32, CPU), prompt {info['prompt_tokens']} tokens, {info['new_tokens']} new tokens, "
        f"budget {info['budget']}, prefill chunk {info['chunk']}; {info['machine']['cpu']}, "
        f"{info['machine']['cores']} cores, torch {info['machine']['torch']} "
        f"({info['machine']['torch_threads']} threads); medians of one run.",
        "",
        "| config | decode step ms (median) | vs dense | policy call ms (median) | calls in decode | "
        "bytes / decode call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bpc = r.get("bytes_per_decode_call")
        call = r.get("policy_call_ms")
        lines.append(
            f"| {r['name']} | {r['decode_step_ms']:.1f} | {r['decode_step_ms'] / dense:.2f}x | "
            f"{'-' if call is None or call != call else f'{call:.1f}'} | {r.get('decode_calls', '-')} | "
            f"{'-' if bpc is None else bpc} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every row once; write JSON + markdown."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=128, help="prefill chunk size")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)

    from nexus_client.hf import LocalBackend, load_model
    from nexus_client.hf.remote import RemoteBackend
    from nexus_sidecar.bench.procs import sidecar_process

    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    ids = prompt_ids(tok, args.prompt_tokens)
    common = dict(budget=args.budget, new_tokens=args.new_tokens, chunk=args.chunk)
    rows: list[dict[str, Any]] = []

    dense_steps(model, ids[:64], 8)  # warm-up (first-call allocations)
    rows.append({"name": "dense", "k": None, "decode_step_ms": _median_ms(dense_steps(model, ids, args.new_tokens)),
                 "policy_call_ms": None, "decode_calls": 0})
    print(f"dense: {rows[-1]['decode_step_ms']:.1f} ms/step", file=sys.stderr)
    policy_row("warm-up", model, tok, ids[:64], LocalBackend(), 1, 32, 8, 32)
    for k in (1, 16):
        rows.append(policy_row(f"local k={k}", model, tok, ids, LocalBackend(), k, **common))
        print(f"{rows[-1]['name']}: {rows[-1]['decode_step_ms']:.1f} ms/step", file=sys.stderr)
    with sidecar_process("--store", "memory", "--device", "cpu", "--max-delay-us", "0") as proc:
        for dtype, label in ((torch.float32, "remote"), (torch.float16, "remote fp16")):
            for k in (1, 16):
                with RemoteBackend(proc.target, float_dtype=dtype, session_prefix=f"bench-{k}-{label[-4:]}") as rb:
                    if not rows[-1]["name"].startswith("remote"):
                        policy_row("warm-up", model, tok, ids[:64], rb, 1, 32, 8, 32)
                    rows.append(policy_row(f"{label} k={k}", model, tok, ids, rb, k, **common))
                print(f"{rows[-1]['name']}: {rows[-1]['decode_step_ms']:.1f} ms/step, "
                      f"{rows[-1]['bytes_per_decode_call']} B/decode call", file=sys.stderr)

    info = {"model": args.model, "prompt_tokens": len(ids), "machine": machine(), **common}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "worker_overhead.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, info)
    (args.out / "worker_overhead.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
