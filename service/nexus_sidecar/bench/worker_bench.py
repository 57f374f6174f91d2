"""``nexus-sidecar bench worker``: what the eviction policy costs a decoding worker, and what pipelining hides.

Part 1, decode step time (SmolLM2-135M, fp32, batch 1, greedy, the same prompt every row):

* ``dense``: plain transformers decoding (``DynamicCache``, sdpa), no policy;
* ``local``: :func:`nexus_client.hf.generate` with the engine in-process (blocking calls);
* ``blocking`` / ``pipelined``: :class:`~nexus_client.hf.remote.RemoteBackend` against a real
  ``nexus-sidecar serve`` subprocess (memory store) through a loopback TCP proxy
  (:class:`~nexus_sidecar.bench.delay_proxy.DelayProxy`) that holds every response ``delay_ms``:
  a slow sidecar made for real, nothing sleeps in the product.

for k (decode tokens per call) in {1, 4, 16} and delay in {0, 20, 100} ms. ``step_ms`` is the
*mean* decode step (the forward, the summary, the call and the cache surgery; the mean, because a
call every 16 steps hides in a median), ``vs_dense`` its ratio to the dense mean step. Budget
``budget``, slack k (pipelined and blocking alike: the calls are k apart).

Part 2, summary cost per call at 512, 2k and 4k cached tokens (a cache of SmolLM2's shapes): one
decode forward (sdpa) for scale; the q/k/v summary of a call (:func:`nexus_client.summary.summarize`)
with k = 1 and k = 16 pending queries, without and with the priors (the slots' key/value norms kept
between calls as PolicyRun does, and computed afresh: ``qkv_priors_fresh_ms``); and what eager capture cost
for the same call: k forwards with transformers' eager attention (probabilities materialised)
minus k sdpa forwards. Best of ``repeats`` timings (part 2 only).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nexus_sidecar.bench.report import machine, markdown_table

TEXT = (
    "The archive holds the records of the northern survey. Each entry lists a station, the date of the "
    "measurement, the observer and the readings of wind, pressure and temperature. The secret code of the "
    "archive is 7215. Station records continue for many pages, and the observers changed every season. "
)


@dataclass
class WorkerBenchSettings:
    """The grid (``quick()`` for a run under 10 minutes on a shared 2-core CPU)."""

    model: str = "smollm2"
    prompt_tokens: int = 300
    new_tokens: int = 96
    budget: int = 128
    chunk: int = 128
    ks: tuple[int, ...] = (1, 4, 16)
    delays_ms: tuple[int, ...] = (0, 20, 100)
    cached: tuple[int, ...] = (512, 2048, 4096)
    repeats: int = 7
    policy: str = "nexus"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> WorkerBenchSettings:
        """Fewer tokens and repeats; the same grid."""
        return cls(new_tokens=32, repeats=3)


def _prompt(tokenizer: Any, n: int) -> list[int]:
    ids: list[int] = tokenizer(TEXT * (1 + n // 40), return_tensors="pt").input_ids[0].tolist()
    if len(ids) < n:
        raise RuntimeError(f"prompt text too short: {len(ids)} < {n} tokens")
    return ids[:n]


@torch.inference_mode()
def dense_steps(model: Any, ids: list[int], new_tokens: int) -> list[float]:
    """Per-step seconds of plain greedy decoding (prefill not timed)."""
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


def _decode_row(mode: str, model: Any, ids: list[int], backend: Any, k: int, delay_ms: int,
                s: WorkerBenchSettings) -> dict[str, Any]:
    from nexus_client.hf import generate

    # A dense run right before each row: on a shared machine the forward's speed drifts by tens of
    # percent within minutes, so each row is compared with its own neighbour.
    dense_ms = 1000 * statistics.fmean(dense_steps(model, ids, s.new_tokens))

    cfg = dict(policy=s.policy, budget=s.budget, slack=k, sinks=4, recent=16, groups=1, seed=0, **s.extra)
    res = generate(model, None, ids, backend, cfg, max_new_tokens=s.new_tokens, every_k=k, chunk_size=s.chunk,
                   stop_at_eos=False, pipeline=mode == "pipelined")
    t = res.timings
    steps = t["decode_steps"]
    calls = [p for p in t["policy_steps"] if p > 0]
    step_ms = 1000 * statistics.fmean(steps)
    held = max(t["cache_at_call"], default=0)
    peak = max((size for step, size in res.cache_sizes_over_time if step >= 0), default=0)
    forward_ms = 1000 * statistics.fmean(t["forward_steps"])
    return {"mode": mode, "k": k, "delay_ms": delay_ms, "step_ms": round(step_ms, 2),
            "vs_dense": round(step_ms / dense_ms, 3), "dense_ms": round(dense_ms, 2),
            "overhead_ms": round(step_ms - forward_ms, 2), "median_step_ms": round(1000 * statistics.median(steps), 2),
            "forward_ms": round(forward_ms, 2),
            "call_ms": round(1000 * statistics.median(calls), 2) if calls else None,
            "wait_ms_total": round(1000 * t["wait_s"], 1), "decode_calls": len(calls),
            "summary_ms_per_call": round(1000 * t["summary_s"] / max(1, res.policy_calls), 2),
            "held_at_call_max": held, "peak_cache": peak, "bound": s.budget + k + k}  # fmt: skip


def decode_rows(s: WorkerBenchSettings, model: Any, tok: Any, progress: bool) -> tuple[list[dict[str, Any]], float]:
    """Part 1: dense, local, blocking and pipelined rows."""
    from nexus_client.hf import LocalBackend
    from nexus_client.hf.remote import RemoteBackend

    from nexus_sidecar.bench.delay_proxy import DelayProxy
    from nexus_sidecar.bench.procs import sidecar_process

    ids = _prompt(tok, s.prompt_tokens)
    dense_steps(model, ids[:64], 8)  # warm-up
    dense_ms = 1000 * statistics.fmean(dense_steps(model, ids, s.new_tokens))
    rows: list[dict[str, Any]] = [{"mode": "dense", "k": 0, "delay_ms": 0, "step_ms": round(dense_ms, 2),
                                   "vs_dense": 1.0}]

    def note(row: dict[str, Any]) -> None:
        rows.append(row)
        if progress:
            print(f"{row['mode']:>9} k={row['k']:<2} delay={row['delay_ms']:>3} ms: {row['step_ms']:.1f} ms/step "
                  f"({row['vs_dense']:.2f}x dense)", file=sys.stderr)

    for k in s.ks:
        note(_decode_row("local", model, ids, LocalBackend(), k, 0, s))
    with sidecar_process("--store", "memory", "--device", "cpu", "--max-delay-us", "0",
                         "--torch-threads", "1") as proc:
        for delay in s.delays_ms:
            with DelayProxy(proc.target, delay / 1000.0) as proxy:
                for k in s.ks:
                    for mode in ("blocking", "pipelined"):
                        with RemoteBackend(proxy.target, session_prefix=f"bench-{mode}-{k}-{delay}") as rb:
                            note(_decode_row(mode, model, ids, rb, k, delay, s))
    add_estimates(rows)
    return rows, dense_ms


def add_estimates(rows: list[dict[str, Any]]) -> None:
    """``est_vs_dense``: (reference dense step + the row's overhead) / reference dense step.

    The reference is the median of the rows' paired dense runs. The overhead (mean step minus mean
    forward, measured within the same steps) is what the policy adds; it does not swing with the
    forward's speed the way whole-step ratios do on a shared CPU.
    """
    ref = statistics.median(r["dense_ms"] for r in rows if "dense_ms" in r)
    for r in rows:
        if "overhead_ms" in r:
            r["est_vs_dense"] = round((ref + r["overhead_ms"]) / ref, 3)


def _synthetic_cache(model: Any, length: int, seed: int = 0) -> Any:
    """A DynamicCache of ``length`` random slots with the model's shapes (timing only)."""
    from transformers import DynamicCache

    cfg = model.config
    hkv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=cfg)
    for layer in range(int(cfg.num_hidden_layers)):
        cache.update(torch.randn(1, hkv, length, d, generator=gen), torch.randn(1, hkv, length, d, generator=gen),
                     layer)
    return cache


def _best_s(fn: Any, repeats: int) -> float:
    """Fastest of ``repeats`` timings after a warm-up: CPU-bound kernels only get slower when the
    machine is shared, so the minimum is the least noisy estimate of their own cost."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def summary_rows(s: WorkerBenchSettings, model: Any) -> list[dict[str, Any]]:
    """Part 2: summary cost per call vs one decode forward, q/k/v vs eager capture."""
    import copy

    from nexus_client.hf.capture import QueryRecorder, attention_modules, cache_kv, capture_queries
    from nexus_client.summary import slot_norms, summarize

    rows = []
    n_layers = len(attention_modules(model))
    for length in s.cached:
        base = _synthetic_cache(model, length - 1)
        token = torch.tensor([[42]])
        pos = torch.tensor([[length - 1]])

        def forward(impl: str, base: Any = base, token: torch.Tensor = token, pos: torch.Tensor = pos) -> None:
            model.set_attn_implementation(impl)
            model(input_ids=token, position_ids=pos, past_key_values=copy.deepcopy(base), use_cache=True,
                  output_attentions=impl == "eager")

        clone_s = _best_s(lambda base=base: copy.deepcopy(base), s.repeats)
        sdpa_s = _best_s(lambda: forward("sdpa"), s.repeats) - clone_s
        eager_s = _best_s(lambda: forward("eager"), s.repeats) - clone_s
        model.set_attn_implementation("sdpa")
        for k in (1, 16):
            # The k pending queries of a call, recorded from a k-token pass on a cache of `length` slots.
            cache = _synthetic_cache(model, length - k)
            rec = QueryRecorder(n_layers)
            with capture_queries(model, rec):
                model(input_ids=torch.full((1, k), 42), position_ids=torch.arange(length - k, length)[None],
                      past_key_values=cache, use_cache=True)
            fq = rec.take()
            keys, values = cache_kv(cache)
            slots = [torch.arange(length)]

            kept = [slot_norms(kk[:, : length - k], vv[:, : length - k]) for kk, vv in zip(keys, values, strict=True)]

            def qkv(priors: bool, keep_norms: bool = False) -> None:
                norms = None
                if keep_norms:  # as PolicyRun: the old slots' norms kept, the k new ones computed
                    new = [slot_norms(kk[:, length - k :], vv[:, length - k :])  # noqa: B023
                           for kk, vv in zip(keys, values, strict=True)]  # noqa: B023
                    norms = [(torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1))
                             for a, b in zip(kept, new, strict=True)]  # noqa: B023
                summarize(fq.queries, keys, values, slots, scaling=fq.scaling, priors=priors,  # noqa: B023
                          norms=norms)

            qkv_s = _best_s(lambda: qkv(False), s.repeats)
            qkv_p_s = _best_s(lambda: qkv(True, keep_norms=True), s.repeats)
            fresh_s = _best_s(lambda: qkv(True), s.repeats)
            eager_extra = k * max(0.0, eager_s - sdpa_s)  # eager capture: every forward of the call ran eager
            rows.append({"cached": length, "k": k, "decode_forward_ms": round(1000 * sdpa_s, 2),
                         "eager_forward_ms": round(1000 * eager_s, 2), "qkv_ms": round(1000 * qkv_s, 2),
                         "qkv_priors_ms": round(1000 * qkv_p_s, 2), "qkv_priors_fresh_ms": round(1000 * fresh_s, 2),
                         "eager_extra_ms": round(1000 * eager_extra, 2),
                         "qkv_vs_forward": round(qkv_s / sdpa_s, 3),
                         "qkv_priors_vs_forward": round(qkv_p_s / sdpa_s, 3),
                         "eager_vs_forward": round(eager_extra / sdpa_s, 3)})  # fmt: skip
    return rows


def run(s: WorkerBenchSettings, progress: bool = True, threads: int = 1) -> dict[str, Any]:
    """Both parts; returns the payload (``rows``: decode steps, ``summary_cost``: per call)."""
    import signal

    from nexus_client.hf import load_model

    # A SIGTERM unwinds like an exception, so the sidecar subprocess and the proxy are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    loaded = load_model(s.model)
    model = loaded.model
    t0 = time.perf_counter()
    rows, dense_ms = decode_rows(s, model, loaded.tokenizer, progress)
    cost = summary_rows(s, model)
    return {"settings": asdict(s), "machine": machine(), "dense_step_ms": round(dense_ms, 2), "rows": rows,
            "summary_cost": cost, "seconds": round(time.perf_counter() - t0, 1)}


def table(payload: dict[str, Any]) -> str:
    """Two markdown tables and the machine line."""
    m, st = payload["machine"], payload["settings"]
    head = (f"SmolLM2-135M fp32 on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, {m['torch_threads']} "
            f"thread(s)); prompt {st['prompt_tokens']}, {st['new_tokens']} new tokens, budget {st['budget']}, "
            f"slack k; remote = serve subprocess behind a loopback proxy holding each response delay_ms. "
            f"Means of one run ({payload['seconds']} s).")
    t1 = markdown_table(payload["rows"], ["mode", "k", "delay_ms", "step_ms", "dense_ms", "vs_dense", "overhead_ms",
                                          "est_vs_dense", "summary_ms_per_call",
                                          "call_ms", "wait_ms_total", "decode_calls", "held_at_call_max",
                                          "peak_cache"])
    t2 = markdown_table(payload["summary_cost"], ["cached", "k", "decode_forward_ms", "eager_forward_ms", "qkv_ms",
                                                  "qkv_priors_ms", "qkv_priors_fresh_ms", "eager_extra_ms",
                                                  "qkv_vs_forward",
                                                  "qkv_priors_vs_forward", "eager_vs_forward"])
    return (f"{head}\n\nDecode step time:\n\n{t1}\n\nSummary cost per call of k decode tokens (q/k/v: one "
            f"summarize call; eager: k forwards with eager attention instead of sdpa; ratios to one sdpa decode "
            f"forward):\n\n{t2}")
