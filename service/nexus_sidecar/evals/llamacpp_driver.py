"""The evaluation's settings run inside llama.cpp (``nexus-sidecar eval --engine llamacpp``).

Same tokens as the transformers path (the caller tokenizes with the same tokenizer), same settings
and budgets as :mod:`.driver`, the context compressed by the llama.cpp worker
(:class:`nexus_client.llamacpp.LlamaWorker`) in llama.cpp's own KV cache:

- ``dense`` / ``streaming`` / ``agnostic``: the context goes into sequence 0 (``streaming``: in
  chunks with a call after each; ``agnostic``: one chunk, one call with the observation window);
  each question then branches off it: ``llama_memory_seq_cp`` gives sequence 1 the context's cells
  (shared, not copied), the question and the answer are decoded there without eviction, and the
  branch is dropped (``seq_rm``) before the next question.
- ``aware`` / ``decode``: context + question as one prompt (one chunk, one call of kind "question"
  with the window), the answer decoded under the budget in ``decode`` only.

``peak_cache`` is read from llama.cpp: the most cells the sequences held at any call, and the
branch's cells after its answer. kvpress presses and KVzip do not run here (they need
transformers' modules).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from nexus_client.hf.backends import PolicyBackend
from nexus_client.hf.decode import greedy_decode
from nexus_client.llamacpp import LlamaModel, LlamaWorker

from nexus_sidecar.evals.driver import SETTINGS, Answer, DriveResult

LLAMACPP_SETTINGS = ("dense", *SETTINGS)
# Dense prefill in 512-token graphs: a 2k prefill took 11.0 CPU s this way and 12.3 s as one graph
# (flash attention's tiles over the whole causal square; F16 weights, AVX-512 build, 1 thread).
DENSE_CHUNK = 512


def kv_bytes_per_token(model: LlamaModel) -> int:
    """KV bytes one token occupies in llama.cpp's cache (float16 K and V, every layer)."""
    s = model.shape
    return s.n_layer * 2 * s.n_head_kv * s.head_dim * 2


def drive_llamacpp(model: LlamaModel, tokenizer: Any, context: Sequence[int], questions: Sequence[Sequence[int]],
                   max_new_tokens: int, *, setting: str, backend: PolicyBackend | None = None,
                   policy_config: Mapping[str, Any] | None = None, window: int = 32, chunk_size: int = 64,
                   stop_ids: Sequence[int] = (), pipeline: bool = False) -> DriveResult:  # fmt: skip
    """Compress ``context`` in ``setting`` inside llama.cpp, then answer each question greedily
    (``tokenizer``: the transformers tokenizer that made the ids, to write the answers' text).

    ``pipeline``: as :func:`nexus_sidecar.evals.driver.drive`: in ``streaming`` and ``decode`` each
    call's answer is applied right before the next call (the last context call's before the
    question); the one-shot settings have nothing to overlap."""
    if setting not in LLAMACPP_SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; known: {', '.join(LLAMACPP_SETTINGS)}")
    if (setting == "dense") != (backend is None):
        raise ValueError("dense takes no backend; every other setting takes one")
    if model.n_seq < 2:
        raise ValueError("the evaluation needs a context with n_seq >= 2 (sequence 1 is the question branch)")
    if not context or not questions or any(not q for q in questions) or max_new_tokens < 1:
        raise ValueError("need a context, >= 1 non-empty question and max_new_tokens >= 1")
    t0 = time.perf_counter()
    ctx = [int(t) for t in context]
    n_ctx = len(ctx)
    stops = {int(s) for s in stop_ids}
    answers: list[Answer] = []
    peak = calls = evicted = kept_context = 0
    timings = {"decode_s": 0.0, "policy_s": 0.0, "summary_s": 0.0, "wait_s": 0.0}

    def account(worker: LlamaWorker, res: Any) -> None:
        nonlocal peak, calls, evicted
        peak = max(peak, res.engine_cells_max, model.cell_count(0))
        calls += res.policy_calls
        evicted += res.evicted
        timings["decode_s"] += worker.stats.decode_s
        timings["policy_s"] += worker.stats.policy_s
        timings["summary_s"] += worker.stats.summary_s
        timings["wait_s"] += worker.stats.wait_s

    if setting in ("aware", "decode"):
        for q in questions:
            prompt = ctx + [int(t) for t in q]
            worker = LlamaWorker(model, backend, policy_config, chunk_size=len(prompt), window=window,
                                 prefill_kind="question", policy_on_decode=setting == "decode",
                                 pipeline=pipeline and setting == "decode")  # fmt: skip
            [res] = _generate_until(worker, prompt, max_new_tokens, stops)
            account(worker, res)
            retained = [p for p in _retained(model, 0) if p < n_ctx]
            kept_context = max(kept_context, res.engine_cells_after_call[0] if res.engine_cells_after_call else 0)
            answers.append(Answer(res.token_ids, _text(tokenizer, res.token_ids), retained))
    else:
        if setting == "dense":
            worker = LlamaWorker(model, chunk_size=min(DENSE_CHUNK, model.n_batch))
        else:
            one_shot = setting == "agnostic"
            worker = LlamaWorker(model, backend, policy_config, chunk_size=n_ctx if one_shot else chunk_size,
                                 window=window if one_shot else None, pipeline=pipeline and not one_shot)  # fmt: skip
        [res] = worker.generate([ctx], 0)
        account(worker, res)
        kept_context = model.cell_count(0)
        retained = [p for p in _retained(model, 0) if p < n_ctx]
        for q in questions:
            ids = _branch_answer(model, [int(t) for t in q], n_ctx, max_new_tokens, stops)
            peak = max(peak, model.cell_count(1))
            model.clear(1)
            answers.append(Answer(ids, _text(tokenizer, ids), retained))
    return DriveResult(answers=answers, peak_cache=peak, kept_context=kept_context, policy_calls=calls,
                       evicted=evicted, seconds=time.perf_counter() - t0, timings=timings)  # fmt: skip


def _text(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""


def _retained(model: LlamaModel, seq: int) -> list[int]:
    return sorted(int(p) for p in model.cells(seq))


def _branch_answer(model: LlamaModel, question: list[int], start: int, max_new_tokens: int,
                   stops: set[int]) -> list[int]:  # fmt: skip
    """Sequence 1 := sequence 0's cells (shared), then the question and a greedy answer there."""
    model.clear(1)
    model.lc.llama_memory_seq_cp(model.mem, 0, 1, -1, -1)
    pos = list(range(start, start + len(question)))
    logits = model.decode(question, pos, [1] * len(question), [len(question) - 1]).logits[len(question) - 1]
    at = start + len(question)

    def forward(token: int, step: int) -> torch.Tensor:
        return model.decode([token], [at + step], [1], [0]).logits[0]

    return greedy_decode(logits, forward, max_new_tokens, stops)


def _generate_until(worker: LlamaWorker, prompt: list[int], max_new_tokens: int, stops: set[int]) -> list[Any]:
    """The worker's greedy answer, cut at the evaluation's stop ids (not kept, as :func:`greedy_decode`)."""
    [res] = worker.generate([prompt], max_new_tokens, stop_at_eos=bool(stops))
    ids = res.token_ids
    for i, t in enumerate(ids):
        if t in stops:
            ids = ids[:i]
            break
    res.token_ids = ids
    return [res]
