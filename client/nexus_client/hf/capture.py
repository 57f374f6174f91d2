"""Query capture for transformers causal LMs: the model's own ``sdpa`` attention, plus its queries.

The summary a policy call needs is a function of each layer's post-RoPE queries and the cached
keys (:func:`nexus_client.summary.summarize`); transformers' ``DynamicCache`` already holds the
keys and values, so the only thing to record during the forward pass is the queries. A thin
kernel is registered with transformers' ``AttentionInterface`` under ``"nexus_sdpa"``: it hands
each layer's ``query`` (``[H, q, D]``, RoPE applied) to the module's :class:`QueryRecorder` and
runs ``torch.nn.functional.scaled_dot_product_attention`` (grouped-query heads natively).

Why a kernel of our own rather than ``"sdpa"`` itself:

- The name is not registered with transformers' mask interface, so ``create_causal_mask`` returns
  ``None`` and the kernel builds the causal mask from *its own layer's* key length: the new queries
  are the last ``q`` keys of the layer, whatever its length. That lets every layer keep a different
  number of tokens (per-layer eviction groups), which one model-wide mask cannot describe. Decode
  (``q == 1``) and a first prefill chunk (``q == L``) need no mask at all (``is_causal``).
- The caller passes explicit ``position_ids`` (true absolute positions), so RoPE stays correct on a
  cache whose tokens were evicted: cached keys were rotated at their original positions.

Nothing ``[heads, q, L]`` is formed here (the kernel is fused); recording costs one reference per
layer (the query tensor is kept, not copied). Queries of successive forward passes are
concatenated until the policy call that summarises them (:meth:`QueryRecorder.take`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nexus_client.summary import HeadReduce

__all__ = ["ATTN_IMPL", "ForwardQueries", "HeadReduce", "QueryRecorder", "attention_modules", "cache_kv",
           "capture_queries"]

ATTN_IMPL = "nexus_sdpa"
_RECORDER_ATTR = "_nexus_recorder"


@dataclass
class ForwardQueries:
    """The post-RoPE queries of one or more forward passes: ``queries[l]`` ``[H, q, D]`` per layer,
    and the model's softmax ``scaling``."""

    queries: list[torch.Tensor]
    scaling: float

    @property
    def tokens(self) -> int:
        """Number of tokens (``q``)."""
        return int(self.queries[0].shape[1])

    def cat(self, other: ForwardQueries) -> ForwardQueries:
        """These tokens, then ``other``'s (one layer at a time)."""
        if len(other.queries) != len(self.queries):
            raise ValueError(f"cannot join queries of {len(self.queries)} and {len(other.queries)} layers")
        return ForwardQueries([torch.cat([a, b], dim=1) for a, b in zip(self.queries, other.queries, strict=True)],
                              self.scaling)


class QueryRecorder:
    """Collects every layer's post-RoPE queries during forward passes (batch size 1)."""

    def __init__(self, num_layers: int) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.active = True
        self._queries: list[torch.Tensor | None] = [None] * num_layers
        self._scaling: float | None = None

    def record(self, layer_idx: int, query: torch.Tensor, scaling: float) -> None:
        """Keep layer ``layer_idx``'s queries ``[1, H, q, D]``."""
        if query.shape[0] != 1:
            raise ValueError(f"query capture supports batch size 1, got {query.shape[0]}")
        q = query[0]
        prev = self._queries[layer_idx]
        self._queries[layer_idx] = q if prev is None else torch.cat([prev, q], dim=1)
        self._scaling = scaling

    def take(self) -> ForwardQueries:
        """Every query recorded since the last :meth:`take` (and forget them)."""
        if any(q is None for q in self._queries) or self._scaling is None:
            missing = [i for i, q in enumerate(self._queries) if q is None]
            raise RuntimeError(f"no queries recorded for layers {missing[:5]}...; is the model running "
                               f"attn_implementation={ATTN_IMPL!r} (see capture_queries)?")
        lengths = {int(q.shape[1]) for q in self._queries if q is not None}
        if len(lengths) != 1:
            raise RuntimeError(f"layers recorded different token counts {sorted(lengths)}")
        out = ForwardQueries([q for q in self._queries if q is not None], self._scaling)
        self._queries = [None] * self.num_layers
        return out

    def clear(self) -> None:
        """Forget what was recorded."""
        self._queries = [None] * self.num_layers


def nexus_sdpa_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The model's fused attention (``scaled_dot_product_attention``); hands ``query`` to the recorder.

    ``query``: ``[B, H, q, D]``; ``key``/``value``: ``[B, Hkv, L, D]`` (the layer's whole cache, new
    tokens last). A 4D ``attention_mask`` (additive float or boolean keep) is honoured; without one,
    the causal mask is built against this layer's own key length. ``dropout`` comes before
    ``scaling`` as in transformers' registered kernels: kvpress wraps every registered kernel at
    import and passes ``dropout`` positionally.
    """
    if kwargs.get("sliding_window") or getattr(module, "sliding_window", None):
        raise NotImplementedError("nexus_sdpa does not implement sliding-window attention layers")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        # Silently ignoring these would change the model's outputs; refuse instead.
        raise NotImplementedError("nexus_sdpa does not implement attention logit softcapping or sinks")
    q, d = query.shape[2], query.shape[3]
    length = key.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    recorder: QueryRecorder | None = getattr(module, _RECORDER_ATTR, None)
    if recorder is not None and recorder.active:
        recorder.record(module.layer_idx, query.detach(), float(scaling))
    mask, causal = None, False
    if attention_mask is not None:
        mask = attention_mask[..., -q:, -length:]
    elif q > 1 and q == length:
        causal = True  # top-left aligned equals bottom-right when nothing is cached before
    elif q > 1:
        # Query t (0-based among the q new ones) sits at key index length - q + t.
        qi = torch.arange(q, device=query.device).unsqueeze(1) + (length - q)
        mask = torch.arange(length, device=query.device).unsqueeze(0) <= qi
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register :func:`nexus_sdpa_forward` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, nexus_sdpa_forward)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` (those with a ``layer_idx`` and q/k/v projections), by layer."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules with layer_idx/q_proj found")
    return sorted(mods, key=lambda m: m.layer_idx)


def cache_kv(cache: object) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's keys and values ``[Hkv, L, D]`` (views, batch 0) of a transformers 5.x ``DynamicCache``."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no .layers; expected a transformers 5.x DynamicCache")
    keys, values = [], []
    for i, layer in enumerate(layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or v is None or k.dim() != 4 or k.shape[0] != 1:
            raise ValueError(f"cache layer {i}: expected keys/values [1, Hkv, L, D] of one sequence")
        keys.append(k[0])
        values.append(v[0])
    return keys, values


@contextlib.contextmanager
def capture_queries(model: nn.Module, recorder: QueryRecorder) -> Iterator[QueryRecorder]:
    """Switch ``model`` to the recording ``sdpa`` kernel and attach ``recorder``; restore both on exit."""
    register_attention()
    previous = model.config._attn_implementation
    mods = attention_modules(model)
    if len(mods) != recorder.num_layers:
        raise ValueError(f"recorder expects {recorder.num_layers} layers, model has {len(mods)}")
    model.set_attn_implementation(ATTN_IMPL)
    for m in mods:
        setattr(m, _RECORDER_ATTR, recorder)
    try:
        yield recorder
    finally:
        for m in mods:
            with contextlib.suppress(AttributeError):
                delattr(m, _RECORDER_ATTR)
        model.set_attn_implementation(previous)
