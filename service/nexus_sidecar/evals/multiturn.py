"""The multi-turn setting: one conversation streams through one cache under one budget.

Context chunks and question turns are interleaved (:attr:`~nexus_sidecar.evals.tasks.Sample.conversation`):
each chunk streams in pieces of ``chunk_size`` tokens, each a policy call of kind ``context``; a
question turn is one forward pass and one call of kind ``question``; its answer is decoded greedily
with one call of kind ``decode`` per generated token, and stays in the stream (its last token is fed
too), so the next chunk and every later question see the conversation as it happened. The budget
``round((1 - compression) * context tokens)`` (what ``streaming`` uses) holds all along: after every
call the cache holds at most the budget, and at any moment at most the budget plus one piece.
Nothing is copied or re-prefilled: a later question about the first chunk gets what the policy kept
of it through every turn since. Dense runs the same stream without calls.

Prompt pieces (plain format only): chunk ``i`` (``"\\n\\n"`` before every chunk but the first), then
per question ``"\\n\\n" + question + "\\n" + answer prefix``, each tokenized on its own so no piece
leaks into another.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from nexus_client.hf.backends import PolicyBackend
from nexus_client.hf.cache_surgery import cache_lengths
from nexus_client.hf.capture import QueryRecorder, attention_modules, capture_queries
from nexus_client.hf.decode import greedy_decode
from nexus_client.hf.policy_run import PolicyRun

from nexus_sidecar.evals.driver import Answer, DriveResult, _forward
from nexus_sidecar.evals.tasks import Sample


@dataclass(frozen=True)
class Piece:
    """One stretch of the stream: a context chunk (``question`` None) or a question turn."""

    ids: list[int]
    question: int | None = None  # index into the sample's questions
    evidence: tuple[tuple[int, list[int]], ...] = ()  # context chunk: (question, token indices of its answer)


def conversation_pieces(tokenizer: Any, sample: Sample, chat: bool = False) -> list[Piece]:
    """The sample's conversation as token pieces, with each chunk's answer occurrences per question.

    Evidence: token indices (within the chunk's piece) overlapping a whole-word occurrence of a
    question's answer string, from the tokenizer's offsets (none when it gives no offsets).
    """
    if chat:
        raise ValueError("the multiturn setting uses the plain prompt format (--prompt plain)")
    questions = sample.questions
    pieces: list[Piece] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    for t, turn in enumerate(sample.conversation):
        text = turn.text if t == 0 else "\n\n" + turn.text
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        except (TypeError, KeyError, NotImplementedError):
            ids, offsets = list(tokenizer(text, add_special_tokens=False).input_ids), None
        shift = 0
        if t == 0 and bos is not None and getattr(tokenizer, "add_bos_token", False):
            ids, shift = [bos, *ids], 1
        evidence = []
        for qi, q in enumerate(questions):
            spans = [(m.start(), m.end()) for a in q.answers if a
                     for m in re.finditer(rf"(?<!\w){re.escape(a)}(?!\w)", text)]  # fmt: skip
            if spans and offsets is not None:
                hit = [shift + i for i, (s, e) in enumerate(offsets) if any(s < se and e > ss for ss, se in spans)]
                evidence.append((qi, hit))
        pieces.append(Piece(ids, None, tuple(evidence)))
        for qi in turn.asks:
            q = questions[qi]
            ids = list(tokenizer("\n\n" + q.question + "\n" + q.answer_prefix, add_special_tokens=False).input_ids)
            pieces.append(Piece(ids, qi))
    return pieces


@dataclass
class MultiturnResult(DriveResult):
    """:class:`DriveResult` plus where each piece started in the stream (its first position)."""

    starts: list[int] | None = None
    held_after_calls: int = 0  # the most tokens (max over layers) the cache held right after any call
    calls_by_kind: dict[str, int] | None = None
    layer_lengths: list[int] | None = None  # tokens each layer holds at the end (per-layer groups differ)
    peak_layer_tokens: int = 0  # the most tokens all layers held together at any moment (KV bytes / token-layer)


@torch.inference_mode()
def drive_multiturn(
    model: Any,
    tokenizer: Any,
    pieces: Sequence[Piece],
    max_new_tokens: int,
    *,
    backend: PolicyBackend | None = None,
    policy_config: Mapping[str, Any] | None = None,
    chunk_size: int = 64,
    stop_ids: Sequence[int] = (),
) -> MultiturnResult:
    """Stream ``pieces`` through one cache (under ``policy_config['budget']`` when ``backend`` is given).

    Answers come back in question-index order; each :class:`Answer`'s ``retained`` lists the
    positions cached when its question arrived (before the question's own tokens).
    """
    from transformers import DynamicCache

    if not pieces or any(not p.ids for p in pieces) or max_new_tokens < 1 or chunk_size < 1:
        raise ValueError("need non-empty pieces, max_new_tokens >= 1 and chunk_size >= 1")
    if backend is not None and int((policy_config or {}).get("groups", 1)) != 1 \
            and int((policy_config or {}).get("groups", 1)) != len(attention_modules(model)):  # fmt: skip
        raise ValueError("policy_config['groups'] must be 1 (shared) or the model's layer count (per layer)")
    stops = {int(s) for s in stop_ids}
    groups = int((policy_config or {}).get("groups", 1)) if backend is not None else 1
    recorder = QueryRecorder(len(attention_modules(model)))
    t_start = time.perf_counter()
    timings = {"forward_s": 0.0, "policy_s": 0.0}
    cache = DynamicCache(config=model.config)
    slots = [torch.empty(0, dtype=torch.int64) for _ in range(groups)]
    peak = 0
    pos = 0
    answers: dict[int, Answer] = {}
    starts: list[int] = []
    held = 0
    peak_total = 0
    kinds: dict[str, int] = {}
    run = PolicyRun(backend, policy_config or {}, None) if backend is not None else None

    def feed(tokens: torch.Tensor, kind: str) -> torch.Tensor:
        """Forward ``tokens`` at the next positions, then (with a policy) one call of ``kind``."""
        nonlocal peak, pos, held, peak_total
        at = torch.arange(pos, pos + tokens.numel(), dtype=torch.int64)
        t0 = time.perf_counter()
        logits = _forward(model, cache, tokens, at)
        lengths = cache_lengths(cache)
        peak, peak_total = max(peak, max(lengths)), max(peak_total, sum(lengths))
        timings["forward_s"] += time.perf_counter() - t0
        pos += tokens.numel()
        for g in range(groups):
            slots[g] = torch.cat([slots[g], at])
        if run is None:
            recorder.clear()  # dense: nothing reads the queries
        else:
            run.add(recorder.take(), at, slots)
            run.call(cache, slots, kind)
            kinds[kind] = kinds.get(kind, 0) + 1
            held = max(held, max(cache_lengths(cache)))
        return logits

    try:
        with capture_queries(model, recorder):
            for piece in pieces:
                starts.append(pos)
                ids = torch.as_tensor(piece.ids, dtype=torch.int64)
                if piece.question is None:
                    for part in ids.split(chunk_size):
                        feed(part, "context")
                    continue
                retained = sorted(set().union(*(s.tolist() for s in slots)))
                logits = feed(ids, "question")
                fed = 0

                def forward(token: int, step: int) -> torch.Tensor:
                    nonlocal fed
                    fed += 1
                    return feed(torch.tensor([token]), "decode")

                out = greedy_decode(logits, forward, max_new_tokens, stops)
                if len(out) > fed:  # the answer stays in the stream: feed its last token too
                    feed(torch.tensor([out[-1]]), "decode")
                text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
                answers[piece.question] = Answer(out, text, retained)
    finally:
        calls = run.calls if run is not None else 0
        evicted = run.evicted if run is not None else 0
        if run is not None:
            timings["policy_s"] = run.seconds
            run.close()
    return MultiturnResult(
        answers=[answers[q] for q in sorted(answers)],
        peak_cache=peak,
        kept_context=max(cache_lengths(cache)),
        policy_calls=calls,
        evicted=evicted,
        seconds=time.perf_counter() - t_start,
        timings=timings,
        starts=starts,
        held_after_calls=held,
        calls_by_kind=kinds,
        layer_lengths=cache_lengths(cache),
        peak_layer_tokens=peak_total,
    )
