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

from nexus_client.summary import PRIORS, layer_priors, slot_priors

__all__ = ["PRIORS", "cache_priors", "layer_priors"]


def cache_priors(cache: object, groups: int) -> dict[str, torch.Tensor]:
    """The three priors of every slot of ``cache``: ``{name: float32 [groups, L_max]}`` on its device.

    ``groups`` is the session's group count: 1 (averaged over all layers) or the number of layers.
    Pass the dict on as is: ``StepInput(..., **priors)`` in-process, ``pack_step(..., **priors)``
    for a sidecar. (:func:`nexus_client.summary.slot_priors` on the cache's keys and values.)
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no .layers; expected a transformers 5.x DynamicCache")
    keys, values = [], []
    for layer in layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is None or v is None or k.numel() == 0:  # a layer that holds nothing yet
            device = k.device if isinstance(k, torch.Tensor) else None
            k = v = torch.zeros(0, 0, 0, device=device)
        else:
            k, v = k[0], v[0]
        keys.append(k)
        values.append(v)
    return slot_priors(keys, values, groups)
