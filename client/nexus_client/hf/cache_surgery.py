"""Remove evicted positions from a transformers ``DynamicCache``.

In transformers 5.x a ``DynamicCache`` holds one ``DynamicLayer`` per decoder layer in
``cache.layers``; each has ``keys``/``values`` of shape ``[batch, kv_heads, seq, head_dim]`` in
token order, new tokens appended at the end. Surgery index-selects the kept slots along ``seq``.

Keys were rotated (RoPE) at their original absolute positions when they entered the cache, so
dropping slots does not change the kept keys; what the caller must do afterwards is pass explicit
``position_ids`` (true absolute positions of the new tokens) because the cache length no longer
equals the next position, and use an attention path whose mask is built against the shorter cache
(see :mod:`nexus_client.hf.capture`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def cache_lengths(cache: object) -> list[int]:
    """Sequence length of every layer of ``cache``."""
    return [_layer_len(layer) for layer in _layers(cache)]


def _layers(cache: object) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no .layers; expected a transformers 5.x DynamicCache")
    return list(layers)


def _layer_len(layer: object) -> int:
    keys = getattr(layer, "keys", None)
    if keys is None or keys.numel() == 0:
        return 0
    return int(keys.shape[-2])


def apply_keep_mask(cache: object, keep: torch.Tensor | Sequence[torch.Tensor]) -> list[int]:
    """Drop the slots where ``keep`` is False from every layer of ``cache``, in place.

    ``keep`` is either one bool tensor ``[L]`` / ``[1, L]`` applied to every layer (shared group),
    or ``[G, L_max]`` / a list of G tensors with G == number of layers, one per layer (per-layer
    groups; a row may be right-padded with False beyond that layer's length, as the engine pads).
    Returns the new per-layer lengths. Raises ``ValueError`` on a length mismatch, naming the layer.
    """
    layers = _layers(cache)
    if isinstance(keep, torch.Tensor):
        if keep.dtype != torch.bool:
            raise ValueError(f"keep must be bool, got {keep.dtype}")
        rows = [keep] if keep.dim() == 1 else list(keep.unbind(0))
    else:
        rows = list(keep)
    if len(rows) == 1:
        rows = rows * len(layers)
    if len(rows) != len(layers):
        raise ValueError(f"keep has {len(rows)} groups; cache has {len(layers)} layers (use 1 or one per layer)")
    new_lengths = []
    for i, (layer, row) in enumerate(zip(layers, rows, strict=True)):
        n = _layer_len(layer)
        if row.dim() != 1 or row.dtype != torch.bool:
            raise ValueError(f"layer {i}: keep row must be a 1-D bool tensor, got {tuple(row.shape)} {row.dtype}")
        if row.shape[0] < n or bool(row[n:].any()):
            raise ValueError(
                f"layer {i}: keep row covers {row.shape[0]} slots ({int(row[n:].sum()) if row.shape[0] > n else 0} "
                f"kept beyond the end) but the layer holds {n}"
            )
        row = row[:n]
        if n and not bool(row.all()):
            idx = row.nonzero().squeeze(1).to(layer.keys.device)
            # index_select makes a compact copy, so the evicted slots' memory is actually freed.
            layer.keys = layer.keys.index_select(-2, idx)
            layer.values = layer.values.index_select(-2, idx)
        new_lengths.append(_layer_len(layer))
    return new_lengths
