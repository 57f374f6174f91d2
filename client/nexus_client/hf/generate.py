"""Greedy generation with a KV-cache eviction policy enforced during prefill and decode.

The loop, per forward pass: feed the new tokens with their true absolute ``position_ids`` through
the model's own fused attention, recording only the post-RoPE queries
(:mod:`nexus_client.hf.capture`); when a policy call is due, the pending queries and the cache's
keys become one summary (:func:`nexus_client.summary.summarize`), sent to the backend, and the
evicted slots are cut from the ``DynamicCache`` (:mod:`nexus_client.hf.cache_surgery`), all through
:class:`~nexus_client.hf.policy_run.PolicyRun`.

A call is due after every prefill chunk (so the budget holds while a long context streams in), and
during decode every ``every_k`` tokens. Blocking (``pipeline=False``), a call is also made as soon
as the cache exceeds ``budget + slack``; with ``slack < every_k`` that rule fires first once the
cache is full, so set ``slack`` to at least ``every_k - 1`` for the calls to really be ``every_k``
apart. Pipelined (``pipeline=True``), each call's answer is applied right before the next call
(the decode never waits for the backend unless its answer takes longer than ``every_k`` steps);
calls are exactly ``every_k`` apart and the cache holds at most ``budget + slack + every_k``
slots at each call (``budget + slack + 2 * every_k`` at the peak between calls).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from nexus_client.hf.backends import PolicyBackend
from nexus_client.hf.cache_surgery import cache_lengths
from nexus_client.hf.capture import HeadReduce, QueryRecorder, attention_modules, capture_queries
from nexus_client.hf.decode import greedy_decode
from nexus_client.hf.policy_run import PolicyRun


@dataclass
class Eviction:
    """Positions evicted by one policy call (one list per layer group)."""

    step: int
    phase: str  # "prefill" (step = chunk index) or "decode" (step = decode step index)
    positions: list[list[int]]

    @property
    def count(self) -> int:
        """Total number of evicted (group, position) pairs."""
        return sum(len(p) for p in self.positions)


@dataclass
class GenerationResult:
    """Output of :func:`generate`.

    ``cache_sizes_over_time``: ``(decode_step, max cache length over layers)`` after every policy
    call and every decode forward (prefill chunks use negative steps ``-n_chunks..-1``).
    ``timings``: seconds; ``*_steps`` entries are per-decode-step lists.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    cache_sizes_over_time: list[tuple[int, int]]
    evictions: list[Eviction]
    timings: dict[str, Any] = field(default_factory=dict)
    policy_calls: int = 0

    @property
    def max_cache_after_call(self) -> int:
        """Largest cache length observed right after a policy call."""
        return max((s for s in self.timings.get("cache_after_call", [])), default=0)


def _policy_int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"policy_config[{key!r}] must be an int, got {value!r}")
    return value


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | list[int],
    backend: PolicyBackend,
    policy_config: Mapping[str, Any],
    max_new_tokens: int = 64,
    every_k: int = 1,
    chunk_size: int = 512,
    *,
    head_reduce: HeadReduce = "mean",
    obs_window: int | None = None,
    stop_at_eos: bool = True,
    progress: bool = False,
    pipeline: bool = False,
) -> GenerationResult:
    """Greedy-decode ``prompt`` with ``model`` while ``backend`` keeps the KV cache under budget.

    ``policy_config`` holds the engine ``PolicyConfig`` fields (``budget``, ``slack``, ``groups``
    (1 = shared, or the number of layers), ``fanout``, ...). ``prompt`` is text (tokenized with
    special tokens) or token ids; ``tokenizer`` may be ``None`` when ``prompt`` is token ids (then
    ``text`` is empty and decoding never stops at EOS). Batch size is 1. ``obs_window``: ``attn``
    sums only the last ``obs_window`` queries of a call. ``pipeline``: send each call in the
    background and apply its answer right before the next one (module doc).
    """
    from transformers import DynamicCache

    if max_new_tokens < 0 or every_k < 1 or chunk_size < 1:
        raise ValueError(
            f"need max_new_tokens >= 0, every_k >= 1, chunk_size >= 1; got {max_new_tokens}, {every_k}, {chunk_size}"
        )
    budget = _policy_int(policy_config, "budget", 256)
    slack = _policy_int(policy_config, "slack", 0)
    groups = _policy_int(policy_config, "groups", 1)
    _policy_int(policy_config, "fanout", 8)  # validated here; PolicyRun reads it
    num_layers = len(attention_modules(model))
    if groups not in (1, num_layers):
        raise ValueError(f"policy_config['groups'] must be 1 or the model's {num_layers} layers, got {groups}")

    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer")
        ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    else:
        ids = torch.tensor(prompt, dtype=torch.int64)
    if ids.numel() == 0:
        raise ValueError("empty prompt")
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)

    recorder = QueryRecorder(num_layers)
    cache = DynamicCache(config=model.config)
    slots = [torch.empty(0, dtype=torch.int64) for _ in range(groups)]  # positions in cache, per group
    sizes: list[tuple[int, int]] = []
    evictions: list[Eviction] = []
    t: dict[str, Any] = {"prefill_s": 0.0, "policy_s": 0.0, "summary_s": 0.0, "surgery_s": 0.0, "wait_s": 0.0,
                         "cache_after_call": [], "cache_at_call": []}
    t.update(forward_steps=[], policy_steps=[], decode_steps=[])

    def forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = model(
            input_ids=tokens[None].to(device),
            position_ids=positions[None].to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,  # only the last position is read: skips the LM head on prefill chunks
        )
        for g in range(groups):
            slots[g] = torch.cat([slots[g], positions])
        run.add(recorder.take(), positions, slots)
        return out.logits[0, -1]

    def policy_call(step: int, phase: str) -> float:
        t0 = time.perf_counter()
        evicted = run.call(cache, slots, "context" if phase == "prefill" else "decode")
        t["surgery_s"], t["policy_s"], t["summary_s"] = run.surgery_seconds, run.seconds, run.summary_seconds
        t["wait_s"] = run.wait_seconds
        t["cache_at_call"] = run.held_at_call
        if any(evicted):
            evictions.append(Eviction(step=step, phase=phase, positions=evicted))
        size = max(cache_lengths(cache))
        t["cache_after_call"].append(size)
        sizes.append((step, size))
        return time.perf_counter() - t0

    run = PolicyRun(backend, policy_config, window=obs_window, pipeline=pipeline, head_reduce=head_reduce)
    with capture_queries(model, recorder), run:
        t0 = time.perf_counter()
        chunks = list(torch.arange(ids.numel(), dtype=torch.int64).split(chunk_size))
        for c, pos in enumerate(chunks):
            logits = forward(ids[pos], pos)
            policy_call(c - len(chunks), "prefill")
        t["prefill_s"] = time.perf_counter() - t0
        next_pos = ids.numel()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=max_new_tokens, desc="decode", unit="tok", leave=False)

        def decode_forward(token: int, step: int) -> torch.Tensor:
            nonlocal next_pos
            s0 = time.perf_counter()
            logits = forward(torch.tensor([token]), torch.tensor([next_pos]))
            next_pos += 1
            s1 = time.perf_counter()
            size = max(cache_lengths(cache))
            sizes.append((step, size))
            p = 0.0
            if run.pending >= every_k or (not pipeline and size > budget + slack):
                p = policy_call(step, "decode")
            t["forward_steps"].append(s1 - s0)
            t["policy_steps"].append(p)
            t["decode_steps"].append(time.perf_counter() - s0)
            return logits

        stops = {eos} if stop_at_eos and eos is not None else set()
        generated = greedy_decode(logits, decode_forward, max_new_tokens, stops, keep_stop=True,
                                  on_token=None if bar is None else lambda _: bar.update(1))
        if bar is not None:
            bar.close()
    text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationResult(
        text=text,
        token_ids=generated,
        prompt_tokens=int(ids.numel()),
        cache_sizes_over_time=sizes,
        evictions=evictions,
        timings=t,
        policy_calls=run.calls,
    )
