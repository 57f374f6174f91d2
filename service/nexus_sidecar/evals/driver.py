"""Greedy decoding over explicit prompt *segments*, with a policy call after each segment.

:func:`nexus_client.hf.generate` splits the whole prompt into equal chunks, so a question can
straddle two chunks and there is no way to say "compress the context once, then ask". The
evaluation needs exactly that control, so this module re-runs the same loop (same capture,
accumulator and cache surgery, nothing re-implemented below that level) over caller-chosen
segments:

- streaming: ``[ctx[0:C], ctx[C:2C], ..., question]`` -- the budget holds after every chunk, so
  tokens are evicted before the question exists;
- one-shot (question-agnostic): ``[context, question]`` -- the context is compressed once, then the
  question arrives;
- dense: ``backend=None`` -- no policy call at all.

During decode a policy call is made whenever the cache exceeds ``budget`` (``slack`` = 0,
``every_k`` = 1), so the budget holds after every token.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from nexus_client.hf.accumulate import AttentionAccumulator
from nexus_client.hf.backends import PolicyBackend
from nexus_client.hf.cache_surgery import apply_keep_mask, cache_lengths
from nexus_client.hf.capture import AttentionRecorder, ForwardCapture, attention_modules, capture_attention


@dataclass
class Prefix:
    """A prefilled first segment, shared by every run that starts with it (one-shot and dense runs).

    The context prefill is the same forward pass whatever the policy; computing it once per sample
    and deep-copying the cache per run removes most of the one-shot cost. ``cache`` is never mutated.
    """

    ids: list[int]
    cache: Any
    capture: ForwardCapture
    logits: torch.Tensor
    seconds: float


@torch.inference_mode()
def prefill(model: Any, ids: Sequence[int]) -> Prefix:
    """Run ``ids`` (positions ``0..n-1``) through ``model`` once, recording attention as :func:`drive` does."""
    from transformers import DynamicCache

    if not ids:
        raise ValueError("empty prefix")
    t0 = time.perf_counter()
    recorder = AttentionRecorder(len(attention_modules(model)), groups=1)
    cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    tokens = torch.as_tensor(list(ids), dtype=torch.int64)
    with capture_attention(model, recorder):
        recorder.start()
        out = model(input_ids=tokens[None].to(device), position_ids=torch.arange(tokens.numel())[None].to(device),
                    cache=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        cap = recorder.finish()
    return Prefix(list(ids), cache, cap, out.logits[0, -1].clone(), time.perf_counter() - t0)


@dataclass
class DriveResult:
    """What one segmented generation produced.

    ``peak_cache``: the largest cache length (tokens, max over layers) held at any moment, including
    the transient peak right after a segment's forward pass and before its policy call.
    ``max_after_call``: the largest cache length right after a policy call (<= budget).
    ``retained_before_last``: the positions in the cache right before the last segment (the
    question) was fed, i.e. what survived the context.
    """

    token_ids: list[int]
    text: str
    peak_cache: int
    max_after_call: int
    policy_calls: int
    evicted: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    retained_before_last: list[int] = field(default_factory=list)


def kv_bytes_per_token(model: Any) -> int:
    """KV-cache bytes one token occupies: layers x 2 (K and V) x kv_heads x head_dim x dtype bytes."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    dtype_bytes = next(model.parameters()).element_size()
    return int(cfg.num_hidden_layers) * 2 * kv_heads * head_dim * dtype_bytes


@torch.inference_mode()
def drive(
    model: Any,
    tokenizer: Any,
    segments: Sequence[Sequence[int]],
    backend: PolicyBackend | None,
    policy_config: Mapping[str, Any] | None,
    max_new_tokens: int,
    *,
    stop_ids: Sequence[int] = (),
    prefix: Prefix | None = None,
) -> DriveResult:
    """Feed ``segments`` (token ids, in order), calling the policy after each one, then decode greedily.

    ``backend=None`` runs dense attention (no eviction, same attention kernel as the evicting runs so
    numerics match). ``policy_config`` holds the engine ``PolicyConfig`` fields; ``groups`` must be 1
    (a shared eviction set: the setting the evaluation uses). Decoding stops at any of ``stop_ids``
    (the generated stop token is not included) or after ``max_new_tokens`` tokens. ``prefix``: the
    first segment already prefilled by :func:`prefill` (its ids must equal ``segments[0]``); its
    cache is copied, and its prefill time is added to ``seconds`` so timings stay comparable.
    """
    from transformers import DynamicCache

    segs = [torch.as_tensor(list(s), dtype=torch.int64) for s in segments]
    if not segs or any(s.numel() == 0 for s in segs):
        raise ValueError("need at least one segment and no empty segment")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = dict(policy_config or {})
    groups = int(cfg.get("groups", 1))
    if groups != 1:
        raise ValueError(f"drive() uses one shared eviction group; policy_config['groups'] is {groups}")
    budget = int(cfg.get("budget", 1 << 30))
    fanout = int(cfg.get("fanout", 8))
    num_layers = len(attention_modules(model))
    device = next(model.parameters()).device
    stops = set(int(s) for s in stop_ids)

    recorder = AttentionRecorder(num_layers, groups=1)
    acc = AttentionAccumulator(1, fanout)
    if prefix is not None and prefix.ids != [int(x) for x in segs[0]]:
        raise ValueError("prefix ids differ from the first segment")
    cache = DynamicCache(config=model.config) if prefix is None else copy.deepcopy(prefix.cache)
    slots = [torch.empty(0, dtype=torch.int64)]
    stats = {"peak": 0, "after": 0, "calls": 0, "evicted": 0}
    t: dict[str, float] = {"forward_s": 0.0, "policy_s": 0.0}

    def forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        recorder.start()
        out = model(input_ids=tokens[None].to(device), position_ids=positions[None].to(device),
                    cache=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        cap = recorder.finish()
        slots[0] = torch.cat([slots[0], positions])
        if backend is not None:  # dense runs never call the policy: skip the edge extraction cost
            acc.add(cap, positions, slots)
        stats["peak"] = max(stats["peak"], max(cache_lengths(cache)))
        t["forward_s"] += time.perf_counter() - t0
        return out.logits[0, -1]

    def policy_call() -> None:
        assert backend is not None
        t0 = time.perf_counter()
        decision = backend.step(session, acc.build())
        acc.reset()
        keep = decision.keep
        n = slots[0].numel()
        if keep.dim() != 2 or keep.shape[0] != 1 or keep.shape[1] < n or bool(keep[0, n:].any()):
            raise RuntimeError(f"backend returned keep of shape {tuple(keep.shape)} for a cache of {n} slots")
        row = keep[0, :n]
        stats["evicted"] += int((~row).sum())
        slots[0] = slots[0][row]
        apply_keep_mask(cache, row)
        stats["calls"] += 1
        stats["after"] = max(stats["after"], max(cache_lengths(cache)))
        t["policy_s"] += time.perf_counter() - t0

    t_start = time.perf_counter()
    generated: list[int] = []
    before_last: list[int] = []
    with capture_attention(model, recorder):
        session = backend.open(cfg) if backend is not None else None
        try:
            pos = 0
            logits = None
            for i, seg in enumerate(segs):
                if i == len(segs) - 1:
                    before_last = slots[0].tolist()
                positions = torch.arange(pos, pos + seg.numel(), dtype=torch.int64)
                if i == 0 and prefix is not None:
                    slots[0] = positions
                    if backend is not None:
                        acc.add(prefix.capture, positions, slots)
                    stats["peak"] = int(seg.numel())
                    logits = prefix.logits
                else:
                    logits = forward(seg, positions)
                pos += seg.numel()
                if backend is not None:
                    policy_call()
            assert logits is not None
            for step in range(max_new_tokens):
                token = int(torch.argmax(logits))
                if token in stops:
                    break
                generated.append(token)
                if step == max_new_tokens - 1:
                    break  # nothing would read the next logits
                logits = forward(torch.tensor([token]), torch.tensor([pos]))
                pos += 1
                if backend is not None and max(cache_lengths(cache)) > budget:
                    policy_call()
        finally:
            if backend is not None:
                backend.close(session)
    text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else ""
    return DriveResult(
        token_ids=generated,
        text=text,
        peak_cache=stats["peak"],
        max_after_call=stats["after"],
        policy_calls=stats["calls"],
        evicted=stats["evicted"],
        seconds=time.perf_counter() - t_start + (prefix.seconds if prefix is not None else 0.0),
        timings=t,
        retained_before_last=before_last,
    )
