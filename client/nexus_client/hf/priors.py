"""Query-agnostic priors of every cached slot, computed from a transformers ``DynamicCache``.

Attention can only find a token something has attended to; before its question, nothing attends
to a needle. The keys and values can: the worker holds them, the sidecar does not. Per layer and
kv head (``keys``/``values`` ``[1, Hkv, L, D]``, slots in cache order, RoPE already applied):

* ``key_diversity`` = ``-cos(k_i, mean_j k_j / |k_j|)``, the negated cosine of the slot's key to
  the mean unit key of the slots the layer holds (kvpress's ``KeyDiffPress`` score), in [-1, 1];
* ``key_norm`` = ``|k_i|`` (kvpress's ``KnormPress`` keeps the low ones);
* ``value_norm`` = ``|v_i|``.

Each is averaged over the kv heads, then over the layers of a group: one shared group
(``groups == 1``, every layer must hold the same slots) or one group per layer (rows right-padded
with zeros to the longest layer, as ``attn`` is). The result is aligned with the slots of the next
policy call when computed after the forward pass that appended the call's new tokens.

Cost: one pass over each layer's keys and values on the cache's device, no Python loop over tokens
(measured in docs/worker.md).
"""

from __future__ import annotations

import torch

from nexus_client.wire import PRIORS

__all__ = ["PRIORS", "cache_priors", "layer_priors"]

_EPS = 1e-8  # as F.cosine_similarity: a zero key has cosine 0 to anything


def layer_priors(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 ``[3, L]``: key diversity, key norm and value norm of one layer's slots, head-averaged.

    ``keys``/``values``: ``[1, Hkv, L, D]`` (one sequence). Computed in float32 (float64 kept) so
    that a bf16 cache does not round distinct scores onto one value.
    """
    if keys.dim() != 4 or keys.shape[0] != 1 or values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"expected keys/values [1, Hkv, L, D] of one sequence, got {tuple(keys.shape)} / "
                         f"{tuple(values.shape)}")
    dtype = torch.promote_types(keys.dtype, torch.float32)
    k = keys[0].to(dtype)  # [H, L, D]
    k_norm = torch.linalg.vector_norm(k, dim=-1)  # [H, L]
    # Mean unit key and every key's dot with it as two batched mat-vec products (no [H, L, D]
    # temporary of unit keys; measured ~1.5x faster than dividing the keys first).
    anchor = torch.bmm((1.0 / k_norm.clamp(min=_EPS)).unsqueeze(1), k).squeeze(1) / max(k.shape[1], 1)  # [H, D]
    dot = torch.bmm(k, anchor.unsqueeze(-1)).squeeze(-1)  # [H, L]
    cos = dot / (k_norm * torch.linalg.vector_norm(anchor, dim=-1, keepdim=True)).clamp(min=_EPS)
    # Rounding can put |cos| a hair above 1; the engine rejects values outside [-1, 1].
    diversity = (-cos).clamp(-1.0, 1.0)
    v_norm = torch.linalg.vector_norm(values[0].to(dtype), dim=-1)
    return torch.stack([diversity.mean(0), k_norm.mean(0), v_norm.mean(0)]).to(torch.float32)


def cache_priors(cache: object, groups: int) -> dict[str, torch.Tensor]:
    """The three priors of every slot of ``cache``: ``{name: float32 [groups, L_max]}`` on its device.

    ``groups`` is the session's group count: 1 (averaged over all layers) or the number of layers.
    Pass the dict on as is: ``StepInput(..., **priors)`` in-process, ``pack_step(..., **priors)``
    for a sidecar.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no .layers; expected a transformers 5.x DynamicCache")
    layers = list(layers)
    if groups not in (1, len(layers)):
        raise ValueError(f"groups must be 1 (shared) or the {len(layers)} layers (per layer), got {groups}")
    per_layer = [_layer_priors(layer) for layer in layers]
    lengths = [int(p.shape[1]) for p in per_layer]
    if groups == 1:
        if len(set(lengths)) > 1:
            raise ValueError(f"groups=1 needs every layer to hold the same slots; layer lengths {lengths}")
        stacked = torch.stack(per_layer).mean(0, keepdim=True)  # [1, 3, L]
    else:
        width = max(lengths, default=0)
        stacked = per_layer[0].new_zeros(groups, 3, width)
        for g, p in enumerate(per_layer):
            stacked[g, :, : p.shape[1]] = p
    return {name: stacked[:, i].contiguous() for i, name in enumerate(PRIORS)}


def _layer_priors(layer: object) -> torch.Tensor:
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None or keys.numel() == 0:  # a layer that holds nothing yet
        device = keys.device if isinstance(keys, torch.Tensor) else None
        return torch.zeros(3, 0, dtype=torch.float32, device=device)
    return layer_priors(keys, values)
