"""One policy call's summary from what every serving engine has: post-RoPE queries, keys and values.

No production engine hands an eviction hook attention probabilities (fused kernels never form
them); every engine can hand it, per layer, the new tokens' queries and the cached keys and
values. :func:`summarize` turns those into the sidecar's summary (:class:`StepTensors`), with the
model's scaling, the causal mask and grouped-query heads:

* ``attn[g, i]``: attention mass the call's queries (or the last ``window`` of them, SnapKV's
  observation window) paid to slot ``i``;
* ``last[g, i]``: the newest query's row;
* ``edge_pos/edge_w[g, t]``: each new token's top-F attended positions (self excluded);
* optional query-agnostic priors of every slot (:func:`slot_priors`).

Attention is reduced over the heads of a layer (``mean``, or ``max``: keeps a single retrieval
head's signal) and averaged over the layers of a group (``groups=1``: all layers share one
eviction set and must hold the same slots; ``groups=num_layers``: one set per layer).

Memory is bounded: queries are taken in tiles of ``tq`` rows and keys in tiles of ``tk`` columns so
that no temporary exceeds ``tile_elems`` floats per head block (``[heads, tq, tk]``); when one key
tile does not cover a layer, the softmax is computed in two passes (an online log-sum-exp, then
the probabilities tile by tile). The one full-width buffer is a ``[tq, L]`` float32 accumulator of
the head- and layer-reduced rows of one query tile (the top-F edges of a token need its whole
row). Loops run over layers and tiles, never over tokens or heads; everything stays on the keys'
device.

Accumulation between calls: the queries of every forward pass since the last call are simply
concatenated (per layer, along the token axis) and summarised once, at the call, against the keys
the cache holds then. Between two calls the cache only grows (new slots are appended), so the
causal mask by slot index gives each query exactly the keys it saw when it ran. A pipelined worker
that applies an answer late passes ``retain``: the slots the answer evicted are cut from the summary
(the pending queries keep the mass they paid to the survivors; nothing is renormalised).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from nexus_client.wire import PRIORS

__all__ = ["PRIORS", "HeadReduce", "StepTensors", "layer_priors", "slot_priors", "summarize"]

HeadReduce = Literal["mean", "max"]
DEFAULT_TILE_ELEMS = 1 << 22  # floats in one [heads, tq, tk] score tile: 16 MiB in float32
_EPS = 1e-8  # as F.cosine_similarity: a zero key has cosine 0 to anything


@dataclass
class StepTensors:
    """The summary of one policy call (mirrors the engine's ``StepInput``; no engine import needed).

    ``new_positions`` int64 ``[k]``; ``attn``/``last`` float32 ``[G, n_max + k]`` (zero right padding
    for groups holding fewer slots); ``edge_pos`` int64 ``[G, k, F]`` (-1 = none); ``edge_w`` float32
    ``[G, k, F]``; ``priors``: the query-agnostic priors of every slot (``{name: float32 [G, n_max +
    k]}``, :func:`slot_priors`), empty when not sent; ``call``: what the call's queries are
    (``nexus_client.wire.CALL_KIND``: context, question, decode, unspecified).
    """

    new_positions: torch.Tensor
    attn: torch.Tensor
    last: torch.Tensor
    edge_pos: torch.Tensor
    edge_w: torch.Tensor
    priors: dict[str, torch.Tensor] = field(default_factory=dict)
    call: str = "unspecified"


def _check_layers(queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], groups: int) -> None:
    if len(queries) != len(keys) or not queries:
        raise ValueError(f"queries and keys: one tensor per layer, got {len(queries)} and {len(keys)}")
    if groups not in (1, len(keys)):
        raise ValueError(f"groups: must be 1 (shared) or the {len(keys)} layers (per layer), got {groups}")
    q0 = queries[0].shape[1] if queries[0].dim() == 3 else -1
    for i, (q, k) in enumerate(zip(queries, keys, strict=True)):
        if q.dim() != 3 or k.dim() != 3:
            raise ValueError(f"layer {i}: queries must be [H, q, D] and keys [Hkv, L, D], got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape[2] != k.shape[2] or q.shape[0] % k.shape[0]:
            raise ValueError(f"layer {i}: queries {tuple(q.shape)} do not fit keys {tuple(k.shape)} (head_dim must "
                             "match and heads be a multiple of kv heads)")
        if q.shape[1] != q0:
            raise ValueError(f"layer {i}: {q.shape[1]} queries, layer 0 has {q0}: every layer sees the same tokens")
        if k.shape[1] < q.shape[1]:
            raise ValueError(f"layer {i}: {k.shape[1]} keys for {q.shape[1]} new queries: keys must include the "
                             "new tokens' own slots (last)")


def _layer_rows(query: torch.Tensor, key: torch.Tensor, i0: int, i1: int, scaling: float, head_reduce: HeadReduce,
                tile_elems: int, out: torch.Tensor) -> None:
    """Add layer rows of queries ``i0:i1`` (head-reduced probabilities) into ``out`` ``[i1 - i0, L]``."""
    h, q, d = query.shape
    hkv, length = key.shape[0], key.shape[1]
    rep, tq = h // hkv, i1 - i0
    # Keys past the tile's last query are masked for every row: skip them.
    span = length - q + i1
    qg = query[:, i0:i1].reshape(hkv, rep, tq, d).float()
    kf = key[:, :span]
    tk = max(1, tile_elems // (h * tq))
    qpos = torch.arange(i0, i1, device=key.device).view(tq, 1) + (length - q)  # slot index of each query

    def scores(j0: int, j1: int) -> torch.Tensor:  # [Hkv, rep, tq, j1 - j0], causal-masked
        s = torch.matmul(qg, kf[:, j0:j1].float().transpose(-1, -2).unsqueeze(1)) * scaling
        if j1 > length - q + i0:  # the tile reaches the first query's own slot: mask the future
            kpos = torch.arange(j0, j1, device=key.device).view(1, j1 - j0)
            s = s.masked_fill(kpos > qpos, float("-inf"))
        return s

    def reduce(p: torch.Tensor) -> torch.Tensor:  # over every head of the layer
        return p.mean(dim=(0, 1)) if head_reduce == "mean" else p.amax(dim=(0, 1))

    if tk >= span:
        out[:, :span] += reduce(torch.softmax(scores(0, span), dim=-1))
        return
    # Two passes: log-sum-exp over key tiles (online), then the probabilities tile by tile.
    m = torch.full((hkv, rep, tq, 1), float("-inf"), device=key.device)
    s_sum = torch.zeros((hkv, rep, tq, 1), device=key.device)
    for j0 in range(0, span, tk):
        s = scores(j0, min(span, j0 + tk))
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        # Key 0 is visible to every query and sits in the first tile, so m is finite from then on.
        s_sum = s_sum * torch.exp(m - m_new) + torch.exp(s - m_new).sum(dim=-1, keepdim=True)
        m = m_new
    lse = m + torch.log(s_sum)
    for j0 in range(0, span, tk):
        j1 = min(span, j0 + tk)
        out[:, j0:j1] += reduce(torch.exp(scores(j0, j1) - lse))


def summarize(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor] | None,
    slot_positions: Sequence[torch.Tensor],
    *,
    scaling: float,
    groups: int = 1,
    fanout: int = 8,
    window: int | None = None,
    head_reduce: HeadReduce = "mean",
    priors: bool = False,
    retain: Sequence[torch.Tensor] | None = None,
    exclude_self: bool = True,
    call: str = "unspecified",
    tile_elems: int = DEFAULT_TILE_ELEMS,
) -> StepTensors:
    """The summary of one policy call over the ``q`` new tokens of every layer.

    Per layer ``l`` (any float dtype, any device; all layers on one device):

    * ``queries[l]``: ``[H, q, D]`` the new tokens' queries *after* RoPE (at their true positions),
      in token order; the tokens of every forward pass since the last call, concatenated;
    * ``keys[l]``: ``[Hkv, L_l, D]`` every slot the layer holds, RoPE applied, in slot order, the
      ``q`` new tokens' own keys last (``H`` a multiple of ``Hkv``: grouped-query heads);
    * ``values[l]``: ``[Hkv, L_l, D]`` (read only when ``priors``; may be ``None`` otherwise);
    * ``slot_positions[g]``: int ``[L_g]`` the absolute position of each slot of group ``g`` (the
      last ``q`` are the new tokens' positions); with ``groups=1`` every layer holds these slots.

    ``scaling``: the model's softmax scale (``head_dim ** -0.5`` for Llama). ``window``: ``attn`` sums
    only the last ``window`` queries (``None``: all). ``retain[g]``: bool ``[L_g - q]`` (pipelined
    workers): the older slots an answer applied late keeps; the others are cut from ``attn``,
    ``last``, the edges and the priors (no renormalisation), and the summary covers the retained
    slots, then the new ones. Returns a :class:`StepTensors` on the CPU (float32 / int64).
    """
    _check_layers(queries, keys, groups)
    if head_reduce not in ("mean", "max"):
        raise ValueError(f"head_reduce: must be 'mean' or 'max', got {head_reduce!r}")
    if fanout < 1:
        raise ValueError(f"fanout: must be >= 1, got {fanout}")
    if window is not None and window < 1:
        raise ValueError(f"window: must be >= 1 or None, got {window}")
    if not scaling > 0:
        raise ValueError(f"scaling: must be > 0, got {scaling}")
    if tile_elems < 1:
        raise ValueError(f"tile_elems: must be >= 1, got {tile_elems}")
    if priors and (values is None or len(values) != len(keys)):
        raise ValueError("values: one tensor per layer is needed for the priors")
    if len(slot_positions) != groups:
        raise ValueError(f"slot_positions: one tensor per group ({groups}), got {len(slot_positions)}")
    if retain is not None and len(retain) != groups:
        raise ValueError(f"retain: one mask per group ({groups}), got {len(retain)}")
    n_layers = len(keys)
    q = int(queries[0].shape[1])
    if q == 0:
        raise ValueError("queries: no new tokens (q == 0)")
    members = [list(range(n_layers))] if groups == 1 else [[g] for g in range(n_layers)]
    device = keys[0].device
    attn_rows, last_rows, e_pos, e_w, kept_pos, kept_idx = [], [], [], [], [], []
    for g, layers in enumerate(members):
        length = int(keys[layers[0]].shape[1])
        for li in layers:
            if int(keys[li].shape[1]) != length:
                raise ValueError(f"keys: groups=1 needs every layer to hold the same slots; layer {li} holds "
                                 f"{int(keys[li].shape[1])}, layer {layers[0]} {length}")
        pos = slot_positions[g].to("cpu", torch.int64).reshape(-1)
        if pos.numel() != length:
            raise ValueError(f"slot_positions[{g}]: {pos.numel()} positions for {length} slots")
        if retain is None:
            keep = torch.ones(length, dtype=torch.bool)
        else:
            r = retain[g].to("cpu", torch.bool).reshape(-1)
            if r.numel() != length - q:
                raise ValueError(f"retain[{g}]: {r.numel()} flags for the {length - q} slots older than the new tokens")
            keep = torch.cat([r, torch.ones(q, dtype=torch.bool)])
        idx = keep.nonzero().squeeze(1)
        width = int(idx.numel())
        idx_dev = idx.to(device)
        mass = torch.zeros(width, dtype=torch.float32, device=device)
        edge_idx = torch.full((q, fanout), -1, dtype=torch.int64, device=device)
        edge_w = torch.zeros((q, fanout), dtype=torch.float32, device=device)
        last = None
        h = int(queries[layers[0]].shape[0])
        tq = max(1, min(q, 256, tile_elems // max(1, h * length)))
        w_from = 0 if window is None else max(0, q - window)
        for i0 in range(0, q, tq):
            i1 = min(q, i0 + tq)
            rows = torch.zeros((i1 - i0, length), dtype=torch.float32, device=device)
            for li in layers:
                _layer_rows(queries[li], keys[li], i0, i1, scaling, head_reduce, tile_elems, rows)
            rows /= len(layers)
            if width != length:
                rows = rows.index_select(1, idx_dev)
            if i1 > w_from:
                mass += rows[max(0, w_from - i0):].sum(dim=0)
            if i1 == q:
                last = rows[-1].clone()
            # Top-F edges of each query (its own slot excluded: a self-loop says nothing of others).
            if exclude_self:
                own = torch.arange(i0, i1, device=device) + (width - q)
                rows[torch.arange(i1 - i0, device=device), own] = 0.0
            f = min(fanout, width)
            vals, top = torch.topk(rows, f, dim=-1)
            valid = vals > 0
            edge_idx[i0:i1, :f] = torch.where(valid, top, torch.full_like(top, -1))
            edge_w[i0:i1, :f] = torch.where(valid, vals, torch.zeros_like(vals))
        assert last is not None
        kpos = pos[idx]
        ep = edge_idx.cpu()
        e_pos.append(torch.where(ep >= 0, kpos[ep.clamp(min=0)], ep))
        e_w.append(edge_w.cpu())
        attn_rows.append(mass.cpu())
        last_rows.append(last.cpu())
        kept_pos.append(kpos)
        kept_idx.append(idx)
    width = max(int(r.numel()) for r in attn_rows)
    attn = torch.zeros((groups, width), dtype=torch.float32)
    last_t = torch.zeros((groups, width), dtype=torch.float32)
    for g in range(groups):
        attn[g, : attn_rows[g].numel()] = attn_rows[g]
        last_t[g, : last_rows[g].numel()] = last_rows[g]
    # Attention is non-negative by construction; clamp float noise so the engine's validation
    # (which rejects negatives) never trips on a -0.0.
    attn.clamp_(min=0.0)
    last_t.clamp_(min=0.0)
    new_positions = kept_pos[0][-q:].clone()
    for g in range(1, groups):
        if not torch.equal(kept_pos[g][-q:], new_positions):
            raise ValueError(f"slot_positions[{g}]: the last {q} slots differ from group 0's new positions")
    step = StepTensors(new_positions=new_positions, attn=attn, last=last_t, edge_pos=torch.stack(e_pos),
                       edge_w=torch.stack(e_w), call=call)
    if priors:
        assert values is not None
        if retain is not None:
            sel = [kept_idx[0 if groups == 1 else li].to(device) for li in range(n_layers)]
            ks = [k.index_select(1, s) for k, s in zip(keys, sel, strict=True)]
            vs = [v.index_select(1, s) for v, s in zip(values, sel, strict=True)]
        else:
            ks, vs = list(keys), list(values)
        step.priors = {name: t[:, :width].cpu() for name, t in slot_priors(ks, vs, groups).items()}
    return step


def layer_priors(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 ``[3, L]``: key diversity, key norm and value norm of one layer's slots, head-averaged.

    ``keys``/``values``: ``[Hkv, L, D]`` (or ``[1, Hkv, L, D]``, one sequence), RoPE applied.
    ``key_diversity`` is the negated cosine of a slot's key to the mean unit key of the layer's
    slots (kvpress's KeyDiff score), in [-1, 1]; then ``|k|`` (kvpress's Knorm) and ``|v|``.
    Computed in float32 (float64 kept) so a bf16 cache does not round distinct scores together.
    """
    if keys.dim() == 4:
        if keys.shape[0] != 1 or values.dim() != 4 or values.shape[0] != 1:
            raise ValueError(f"expected keys/values [1, Hkv, L, D] of one sequence, got {tuple(keys.shape)} / "
                             f"{tuple(values.shape)}")
        keys, values = keys[0], values[0]
    if keys.dim() != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"expected keys/values [Hkv, L, D], got {tuple(keys.shape)} / {tuple(values.shape)}")
    dtype = torch.promote_types(keys.dtype, torch.float32)
    k = keys.to(dtype)  # [H, L, D]
    k_norm = torch.linalg.vector_norm(k, dim=-1)  # [H, L]
    # Mean unit key and every key's dot with it as two batched mat-vec products (no [H, L, D]
    # temporary of unit keys; measured ~1.5x faster than dividing the keys first).
    anchor = torch.bmm((1.0 / k_norm.clamp(min=_EPS)).unsqueeze(1), k).squeeze(1) / max(k.shape[1], 1)  # [H, D]
    dot = torch.bmm(k, anchor.unsqueeze(-1)).squeeze(-1)  # [H, L]
    cos = dot / (k_norm * torch.linalg.vector_norm(anchor, dim=-1, keepdim=True)).clamp(min=_EPS)
    # Rounding can put |cos| a hair above 1; the engine rejects values outside [-1, 1].
    diversity = (-cos).clamp(-1.0, 1.0)
    v_norm = torch.linalg.vector_norm(values.to(dtype), dim=-1)
    return torch.stack([diversity.mean(0), k_norm.mean(0), v_norm.mean(0)]).to(torch.float32)


def slot_priors(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], groups: int) -> dict[str, torch.Tensor]:
    """The three priors of every slot: ``{name: float32 [groups, L_max]}`` on the keys' device.

    ``keys[l]``/``values[l]``: ``[Hkv, L_l, D]`` per layer (a layer holding nothing may pass an
    empty tensor). ``groups=1`` averages over all layers (which must hold the same slots);
    ``groups=num_layers`` gives one row per layer, right-padded with zeros like ``attn``.
    """
    if len(keys) != len(values) or not keys:
        raise ValueError(f"keys and values: one tensor per layer, got {len(keys)} and {len(values)}")
    if groups not in (1, len(keys)):
        raise ValueError(f"groups: must be 1 (shared) or the {len(keys)} layers (per layer), got {groups}")
    per_layer = [layer_priors(k, v) if k.numel() else torch.zeros(3, 0, device=k.device)
                 for k, v in zip(keys, values, strict=True)]
    lengths = [int(p.shape[1]) for p in per_layer]
    if groups == 1:
        if len(set(lengths)) > 1:
            raise ValueError(f"groups=1 needs every layer to hold the same slots; layer lengths {lengths}")
        stacked = torch.stack(per_layer).mean(0, keepdim=True)  # [1, 3, L]
    else:
        stacked = per_layer[0].new_zeros(groups, 3, max(lengths, default=0))
        for g, p in enumerate(per_layer):
            stacked[g, :, : p.shape[1]] = p
    return {name: stacked[:, i].contiguous() for i, name in enumerate(PRIORS)}
