"""One context, compressed in one of four settings, then every question of the sample answered from it.

Settings (DESIGN.md section 6); ``compression`` is the fraction of KV pairs removed (kvpress's
definition), applied to what the setting compresses:

- ``dense``: no eviction.
- ``streaming``: the context streams through the cache in chunks and the policy is called after
  every chunk with ``budget = round((1 - compression) * context)``, so tokens are evicted before
  any question exists (the source's continuous-inference setting).
- ``agnostic``: the whole context is prefilled, then compressed once to the same budget (kvpress's
  default protocol). One-shot calls read attention over the observation ``window`` (the last ``w``
  context queries, SnapKV's definition), not summed over every query.
- ``aware``: context and question are prefilled together and compressed once with the window over
  the last ``w`` prompt queries (the question's own), ``budget = round((1 - compression) *
  (context + question))``.
- ``decode``: as ``aware``, and the budget then also holds while the answer is written: every
  generated token is a policy call (kind "decode") that evicts as the cache grows. kvpress's
  prefill presses have no such setting.

In every setting but ``decode`` the question(s) and the answer are then appended without further
eviction (kvpress's protocol): settings differ only in what survived the context. Several questions of one
sample are answered from copies of one compressed cache (``aware`` compresses once per question,
since the question is part of what it sees), with no re-prefill.

Compressors: an engine policy through a :class:`~nexus_client.hf.PolicyBackend` (``policy``), or a
kvpress press (``press``, see :mod:`.kvpress_baselines`), whose own ``compress`` runs on the layer
inputs captured during the shared prefill: the same computation kvpress's forward hook does.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from nexus_client.hf.backends import PolicyBackend
from nexus_client.hf.cache_surgery import cache_lengths
from nexus_client.hf.capture import ForwardQueries, QueryRecorder, attention_modules, capture_queries
from nexus_client.hf.decode import greedy_decode
from nexus_client.hf.policy_run import PolicyRun

from nexus_sidecar.evals.kvpress_baselines import SharedSelection

SETTINGS = ("streaming", "agnostic", "aware", "decode")
ONE_SHOT_QUESTION = ("aware", "decode")  # settings that compress context + question together
Press = Any  # a kvpress BasePress; kvpress is an optional extra


@dataclass
class LayerInputs:
    """What each attention layer received during one forward pass: kvpress's ``compress`` inputs."""

    hidden: list[torch.Tensor]  # per layer [1, q, hidden]
    cos: torch.Tensor  # [1, q, head_dim]
    sin: torch.Tensor

    def cat(self, other: LayerInputs) -> LayerInputs:
        """This pass followed by ``other`` (the question after the context), as one prefill would see it."""
        hidden = [torch.cat([a, b], dim=1) for a, b in zip(self.hidden, other.hidden, strict=True)]
        return LayerInputs(hidden, torch.cat([self.cos, other.cos], dim=1), torch.cat([self.sin, other.sin], dim=1))


class _InputRecorder:
    """Forward hooks that keep each attention layer's ``hidden_states`` and RoPE tables."""

    def __init__(self, model: Any) -> None:
        self.mods = attention_modules(model)
        self.hidden: list[torch.Tensor | None] = [None] * len(self.mods)
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.handles: list[Any] = []

    def __enter__(self) -> _InputRecorder:
        for i, m in enumerate(self.mods):
            self.handles.append(m.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            self.hidden[i] = kwargs["hidden_states"].detach()
            if self.rope is None:
                cos, sin = kwargs["position_embeddings"]
                self.rope = (cos.detach(), sin.detach())

        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def result(self) -> LayerInputs:
        assert self.rope is not None and all(h is not None for h in self.hidden)
        return LayerInputs([h for h in self.hidden if h is not None], *self.rope)


@dataclass
class Prefix:
    """A prefilled context, shared by every run of a sample that starts from it (never mutated)."""

    ids: list[int]
    cache: Any
    queries: ForwardQueries  # the context's post-RoPE queries, every layer
    inputs: LayerInputs
    logits: torch.Tensor
    seconds: float


def _forward(model: Any, cache: Any, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=tokens[None].to(device), position_ids=positions[None].to(device),
                past_key_values=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
    return out.logits[0, -1]


@torch.inference_mode()
def prefill(model: Any, ids: Sequence[int], start: int = 0, cache: Any = None) -> Prefix:
    """Run ``ids`` (at positions ``start..``) through ``model`` on ``cache`` (a new one by default),
    recording every layer's queries and inputs."""
    from transformers import DynamicCache

    if not ids:
        raise ValueError("empty prefix")
    t0 = time.perf_counter()
    recorder = QueryRecorder(len(attention_modules(model)))
    cache = DynamicCache(config=model.config) if cache is None else cache
    tokens = torch.as_tensor(list(ids), dtype=torch.int64)
    with capture_queries(model, recorder), _InputRecorder(model) as inputs:
        logits = _forward(model, cache, tokens, torch.arange(start, start + tokens.numel()))
    return Prefix(list(ids), cache, recorder.take(), inputs.result(), logits.clone(), time.perf_counter() - t0)


@dataclass
class Answer:
    """One question's reply from a compressed context."""

    token_ids: list[int]
    text: str
    retained: list[int] | None  # context positions cached when the question arrived (None: per-head press)


@dataclass
class DriveResult:
    """What one (sample, compressor, setting) produced.

    ``peak_cache``: the most tokens (max over layers) held at any moment, transient peaks included.
    ``kept_context``: cache length right after the context's compression (before any question).
    """

    answers: list[Answer]
    peak_cache: int
    kept_context: int
    policy_calls: int
    evicted: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def kv_bytes_per_token(model: Any) -> int:
    """KV-cache bytes one token occupies: layers x 2 (K and V) x kv_heads x head_dim x dtype bytes."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    dtype_bytes = next(model.parameters()).element_size()
    return int(cfg.num_hidden_layers) * 2 * kv_heads * head_dim * dtype_bytes


@torch.inference_mode()
def apply_press(press: Press, model: Any, cache: Any, inputs: LayerInputs) -> list[int] | None:
    """Compress every layer of ``cache`` in place with kvpress ``press``, from the captured ``inputs``.

    This is the body of kvpress's ``BasePress.forward_hook`` (``compress`` on the layer's inputs,
    then the cache layer replaced), run after the prefill instead of inside it. The two agree
    because a layer's compression never changes the attention output of the pass that filled it.
    Returns the kept positions when ``press`` is a :class:`~.kvpress_baselines.SharedSelection`
    (one set for every layer and head), ``None`` for kvpress's own per-head selection.
    """
    shared = isinstance(press, SharedSelection)
    inner = press.press if shared else press
    inner.post_init_from_model(model)
    base = model.model
    kwargs = {"position_embeddings": (inputs.cos, inputs.sin)}
    layers = list(zip(attention_modules(model), cache.layers, inputs.hidden, strict=True))
    for layer_module, _, _ in layers:
        layer_module.rotary_emb = base.rotary_emb  # what kvpress's context manager sets
    if not shared:
        for layer_module, layer_cache, hidden in layers:
            keys, values = inner.compress(layer_module, hidden, layer_cache.keys, layer_cache.values, None, kwargs)
            layer_cache.keys, layer_cache.values = keys.contiguous(), values.contiguous()
        return None
    from kvpress.utils import compute_n_kept

    # Scores [1, Hkv, T] per layer -> mean over heads, then over layers: the shared group's rule.
    total = torch.stack([inner.score(m, h, c.keys, c.values, None, kwargs)[0].float().mean(0) for m, c, h in layers])
    length = int(total.shape[-1])
    keep = total.mean(0).topk(compute_n_kept(length, inner.compression_ratio)).indices.sort().values
    for _, layer_cache, _ in layers:
        layer_cache.keys = layer_cache.keys[:, :, keep].contiguous()
        layer_cache.values = layer_cache.values[:, :, keep].contiguous()
    return keep.tolist()


@torch.inference_mode()
def drive(
    model: Any,
    tokenizer: Any,
    context: Sequence[int],
    questions: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    setting: str,
    backend: PolicyBackend | None = None,
    policy_config: Mapping[str, Any] | None = None,
    press: Press | None = None,
    window: int = 32,
    chunk_size: int = 64,
    stop_ids: Sequence[int] = (),
    prefix: Prefix | None = None,
    pipeline: bool = False,
) -> DriveResult:
    """Compress ``context`` in ``setting`` (``dense`` needs neither ``backend`` nor ``press``), then
    answer each of ``questions`` greedily (at most ``max_new_tokens``, stopping at ``stop_ids``).

    ``policy_config`` holds the engine ``PolicyConfig`` fields including ``budget``; ``prefix``: the
    context already prefilled by :func:`prefill` (shared across runs; its prefill time is added to
    ``seconds`` so timings stay comparable). ``streaming`` never uses a prefix (it prefills itself).
    ``pipeline``: in ``streaming`` and ``decode`` (the settings that call the policy more than once
    per context or answer), each call's answer is applied right before the next call, not waited
    for (:class:`~nexus_client.hf.policy_run.PolicyRun`); the last context call is applied before
    the question. The one-shot settings have nothing to overlap.
    """
    if setting not in (*SETTINGS, "dense"):
        raise ValueError(f"unknown setting {setting!r}; known: dense, {', '.join(SETTINGS)}")
    if (setting == "dense") != (backend is None and press is None) or (backend is not None and press is not None):
        raise ValueError("dense takes no compressor; every other setting takes exactly one of backend / press")
    if setting in ("streaming", "decode") and press is not None:
        raise ValueError(f"kvpress presses compress a prefill; they have no {setting} setting")
    if not context or not questions or any(not q for q in questions) or max_new_tokens < 1:
        raise ValueError("need a context, >= 1 non-empty question and max_new_tokens >= 1")
    from transformers import DynamicCache

    ctx = torch.as_tensor(list(context), dtype=torch.int64)
    n_ctx = int(ctx.numel())
    stops = {int(s) for s in stop_ids}
    num_layers = len(attention_modules(model))
    recorder = QueryRecorder(num_layers)
    if backend is not None and int((policy_config or {}).get("groups", 1)) != 1:
        raise ValueError("the evaluation uses one shared eviction group (policy_config['groups'] = 1)")
    def policy(overlap: bool = False) -> PolicyRun:
        assert backend is not None
        return PolicyRun(backend, policy_config or {}, None if setting == "streaming" else window,
                         pipeline=overlap and pipeline)
    t_start = time.perf_counter()
    t: dict[str, float] = {"forward_s": 0.0, "policy_s": 0.0}
    peak = 0
    calls = evicted = 0
    answers: list[Answer] = []

    def fwd(cache: Any, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ForwardQueries]:
        nonlocal peak
        t0 = time.perf_counter()
        logits = _forward(model, cache, tokens, positions)
        cap = recorder.take()
        peak = max(peak, max(cache_lengths(cache)))
        t["forward_s"] += time.perf_counter() - t0
        return logits, cap

    def decode(cache: Any, logits: torch.Tensor, pos: int, run: PolicyRun | None = None,
               slots: list[torch.Tensor] | None = None) -> list[int]:
        """The answer; with ``run`` (the ``decode`` setting) every generated token is one policy call."""
        def forward(token: int, step: int) -> torch.Tensor:
            at = torch.tensor([pos + step])
            logits, cap = fwd(cache, torch.tensor([token]), at)
            if run is not None and slots is not None:
                slots[0] = torch.cat([slots[0], at])
                run.add(cap, at, slots)
                run.call(cache, slots, "decode")
            return logits

        return greedy_decode(logits, forward, max_new_tokens, stops)

    def finish(run: PolicyRun | None) -> None:
        nonlocal calls, evicted
        if run is not None:
            calls += run.calls
            evicted += run.evicted
            t["policy_s"] += run.seconds
            run.close()
            t["summary_s"] = t.get("summary_s", 0.0) + run.summary_seconds
            t["wait_s"] = t.get("wait_s", 0.0) + run.wait_seconds

    if setting != "streaming":
        if prefix is None:
            prefix = prefill(model, ctx.tolist())  # before capture_attention below: the two do not nest
        elif prefix.ids != ctx.tolist():
            raise ValueError("prefix ids differ from the context")
    with capture_queries(model, recorder):
        slots = [torch.arange(n_ctx, dtype=torch.int64)]
        if setting == "streaming":
            assert backend is not None
            run = policy(overlap=True)
            try:
                cache = DynamicCache(config=model.config)
                slots = [torch.empty(0, dtype=torch.int64)]
                for pos in torch.arange(n_ctx, dtype=torch.int64).split(chunk_size):
                    _, cap = fwd(cache, ctx[pos], pos)
                    slots[0] = torch.cat([slots[0], pos])
                    run.add(cap, pos, slots)
                    run.call(cache, slots, "context")
                run.drain(cache, slots)  # the question sees the compressed context
            finally:
                finish(run)
        else:
            assert prefix is not None
            peak = max(peak, n_ctx)
            cache = copy.deepcopy(prefix.cache)
            if setting == "agnostic" and backend is not None:
                run = policy()
                try:
                    run.add(prefix.queries, slots[0], slots)
                    run.call(cache, slots, "context")
                finally:
                    finish(run)
            elif setting == "agnostic" and press is not None:
                kept = apply_press(press, model, cache, prefix.inputs)
                # per-head selection keeps no shared position list
                slots = [torch.as_tensor(kept, dtype=torch.int64)] if kept is not None else []
        kept_context = max(cache_lengths(cache)) if setting not in ONE_SHOT_QUESTION else 0

        for q in questions:
            qt = torch.as_tensor(list(q), dtype=torch.int64)
            qpos = torch.arange(n_ctx, n_ctx + qt.numel(), dtype=torch.int64)
            c = copy.deepcopy(cache)
            retained = slots[0].tolist() if slots else None
            if setting in ONE_SHOT_QUESTION and press is not None:
                assert prefix is not None
                with _InputRecorder(model) as q_inputs:  # only a press compressing the question reads them
                    logits, cap = fwd(c, qt, qpos)
                kept = apply_press(press, model, c, prefix.inputs.cat(q_inputs.result()))
                retained = None if kept is None else [p for p in kept if p < n_ctx]
            else:
                logits, cap = fwd(c, qt, qpos)
            s = [slots[0].clone()] if slots else []
            run = policy(overlap=setting == "decode") if setting in ONE_SHOT_QUESTION and backend is not None else None
            try:
                if run is not None:
                    assert prefix is not None
                    s[0] = torch.cat([s[0], qpos])
                    run.add(prefix.queries, s[0][: n_ctx], None)  # the context's queries, then the question's
                    run.add(cap, qpos, s)
                    run.call(c, s, "question")
                    run.drain(c, s)  # the answer starts from the compressed prompt
                    retained = [p for p in s[0].tolist() if p < n_ctx]
                if setting in ONE_SHOT_QUESTION:
                    kept_context = max(kept_context, max(cache_lengths(c)))
                # decode: the budget also holds while the answer is written (one call per token).
                ids = decode(c, logits, n_ctx + int(qt.numel()), run if setting == "decode" else None, s)
            finally:
                finish(run)
            text = tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else ""
            answers.append(Answer(ids, text, retained))
    return DriveResult(
        answers=answers,
        peak_cache=peak,
        kept_context=kept_context,
        policy_calls=calls,
        evicted=evicted,
        seconds=time.perf_counter() - t_start + (prefix.seconds if prefix is not None else 0.0),
        timings=t,
    )
