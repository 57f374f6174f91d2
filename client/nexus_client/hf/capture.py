"""Attention capture for transformers causal LMs.

Choice: a custom attention function registered with transformers' ``AttentionInterface`` under
the name ``"nexus_capture"`` (not ``attn_implementation="eager"`` + ``output_attentions=True``).

Why:
- ``output_attentions`` returns the full ``[B, H, q, L]`` probabilities of every layer at once
  (30 layers x 9 heads for SmolLM2); we only need the head-reduced rows, so this function reduces
  over heads inside each layer and keeps ``[q, L]`` (or less) per layer group.
- The name is not registered with transformers' mask interface, so ``create_causal_mask`` returns
  ``None`` and this function builds its own causal mask from the *key length of its own layer*.
  That is what lets every layer keep a different number of tokens (per-layer groups): the new
  queries are always the last ``q`` keys of the layer, whatever its length. Decode (``q == 1``)
  needs no mask at all.
- The caller passes explicit ``position_ids`` (true absolute positions), so RoPE stays correct on a
  cache whose tokens were evicted: cached keys were rotated at their original positions.

Cost: the attention itself is the eager computation (``softmax(QK^T)V`` in float32, grouped-query
heads handled by a reshape instead of ``repeat_kv`` copies); on top, one head reduction and an add
per layer. Measured on SmolLM2-135M (30 layers, 9 heads, 3 KV heads) on a shared 2-core CPU,
single-token decode with ~230 cached tokens, median of 30 steps, best of 3 rounds: ``sdpa``
67.2 ms/step; this function with recording off 67.2 ms; recording on 69.1 ms (about +2 ms, +3 %,
close to the run-to-run noise of a shared machine). Switching ``attn_implementation`` is not free,
so :func:`capture_attention` is entered once per generation, not per step.
During prefill the probabilities of a chunk (``H x q x L`` floats per layer) are materialised, so
keep ``chunk_size`` moderate (256 by default in the CLI).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

ATTN_IMPL = "nexus_capture"
HeadReduce = Literal["mean", "max"]
_RECORDER_ATTR = "_nexus_recorder"


@dataclass
class ForwardCapture:
    """What one forward pass paid attention to, per layer group.

    ``mass[g]``: ``[L_g]`` attention summed over the (observed) new queries, reduced over heads
    (and averaged over the layers of the group). ``last[g]``: ``[L_g]`` the newest query's row.
    ``rows[g]``: ``[q, L_g]`` every new query's row (for edge extraction). ``L_g`` is the key length
    of the group *including* the ``q`` new tokens, which are its last ``q`` slots.
    """

    mass: list[torch.Tensor]
    last: list[torch.Tensor]
    rows: list[torch.Tensor]


class AttentionRecorder:
    """Collects head-reduced attention from every layer during one forward pass.

    ``groups == 1``: one shared group, rows averaged over all layers (all layers hold the same
    tokens). ``groups == num_layers``: one group per layer. ``obs_window``: when set, ``mass`` sums
    only the last ``obs_window`` queries of the pass (a SnapKV-style observation window for long
    prefill chunks); ``rows`` always cover every query so each token gets its edges.
    """

    def __init__(
        self,
        num_layers: int,
        groups: int = 1,
        head_reduce: HeadReduce = "mean",
        obs_window: int | None = None,
    ) -> None:
        if groups not in (1, num_layers):
            raise ValueError(f"groups must be 1 (shared) or num_layers={num_layers} (per layer), got {groups}")
        if head_reduce not in ("mean", "max"):
            raise ValueError(f"head_reduce must be 'mean' or 'max', got {head_reduce!r}")
        if obs_window is not None and obs_window < 1:
            raise ValueError(f"obs_window must be >= 1 or None, got {obs_window}")
        self.num_layers = num_layers
        self.groups = groups
        self.head_reduce: HeadReduce = head_reduce
        self.obs_window = obs_window
        self.active = False
        self._rows: list[torch.Tensor | None] = [None] * groups
        self._seen = [0] * groups

    def start(self) -> None:
        """Begin recording one forward pass."""
        self._rows = [None] * self.groups
        self._seen = [0] * self.groups
        self.active = True

    def record(self, layer_idx: int, probs: torch.Tensor) -> None:
        """Store layer ``layer_idx``'s probabilities ``[1, H, q, L]`` reduced over heads."""
        if probs.shape[0] != 1:
            raise ValueError(f"attention capture supports batch size 1, got {probs.shape[0]}")
        reduced = probs[0].mean(dim=0) if self.head_reduce == "mean" else probs[0].amax(dim=0)
        g = 0 if self.groups == 1 else layer_idx
        prev = self._rows[g]
        if prev is None:
            self._rows[g] = reduced.float().clone()
        else:
            if prev.shape != reduced.shape:
                raise ValueError(
                    f"layer {layer_idx} has {reduced.shape[-1]} keys but shared group 0 has {prev.shape[-1]}: "
                    "with groups=1 every layer must hold the same tokens"
                )
            prev.add_(reduced)
        self._seen[g] += 1

    def finish(self) -> ForwardCapture:
        """End the pass and return the per-group capture."""
        self.active = False
        expected = self.num_layers // self.groups
        mass, last, rows = [], [], []
        for g, r in enumerate(self._rows):
            if r is None or self._seen[g] != expected:
                raise RuntimeError(
                    f"group {g}: captured {self._seen[g]} layers, expected {expected}; is the model using "
                    f"attn_implementation={ATTN_IMPL!r} (see capture_attention)?"
                )
            r = r / expected
            window = r if self.obs_window is None else r[-self.obs_window :]
            mass.append(window.sum(dim=0))
            last.append(r[-1].clone())
            rows.append(r)
        return ForwardCapture(mass=mass, last=last, rows=rows)


def nexus_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Eager attention that also hands head-reduced probabilities to the module's recorder.

    ``query``: ``[B, H, q, D]``; ``key``/``value``: ``[B, Hkv, L, D]`` (the layer's whole cache,
    new tokens last). A 4D ``attention_mask`` (additive float or boolean keep) is honoured; without
    one, the causal mask is built against this layer's own key length. ``dropout`` comes before
    ``scaling`` as in transformers' registered kernels (sdpa, flash): kvpress wraps every registered
    kernel at import and passes ``dropout`` positionally (``scaling`` first broke under that wrapper).
    """
    if kwargs.get("sliding_window") or getattr(module, "sliding_window", None):
        raise NotImplementedError("nexus_capture does not implement sliding-window attention layers")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        # Silently ignoring these would change the model's outputs; refuse instead.
        raise NotImplementedError("nexus_capture does not implement attention logit softcapping or sinks")
    b, h, q, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    rep = h // hkv
    scaling = d**-0.5 if scaling is None else scaling
    # Grouped-query attention by reshape (no repeat_kv copy): [B, Hkv, rep, q, D] x [B, Hkv, 1, D, L].
    qg = query.reshape(b, hkv, rep, q, d).float()
    scores = torch.matmul(qg, key.float().unsqueeze(2).transpose(-1, -2)) * scaling
    scores = scores.reshape(b, h, q, length)
    if attention_mask is not None:
        mask = attention_mask[..., -q:, -length:]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    elif q > 1:
        # Query t (0-based among the q new ones) sits at key index length - q + t.
        qi = torch.arange(q, device=query.device).unsqueeze(1) + (length - q)
        ki = torch.arange(length, device=query.device).unsqueeze(0)
        scores = scores.masked_fill(ki > qi, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    recorder: AttentionRecorder | None = getattr(module, _RECORDER_ATTR, None)
    if recorder is not None and recorder.active:
        recorder.record(module.layer_idx, probs)
    out = torch.matmul(probs.reshape(b, hkv, rep, q, length), value.float().unsqueeze(2))
    out = out.reshape(b, h, q, d).to(query.dtype).transpose(1, 2).contiguous()
    return out, None


def register_attention() -> None:
    """Register :func:`nexus_attention_forward` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, nexus_attention_forward)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` (those with a ``layer_idx`` and q/k/v projections), by layer."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules with layer_idx/q_proj found")
    return sorted(mods, key=lambda m: m.layer_idx)


@contextlib.contextmanager
def capture_attention(model: nn.Module, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """Switch ``model`` to the capturing attention and attach ``recorder``; restore both on exit."""
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
