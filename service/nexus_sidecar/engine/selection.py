"""Eviction selection: which unprotected slots (or blocks) go, once a row is over budget.

Sampled policies rank units by weighted-reservoir keys (Efraimidis-Spirakis A-Res):
``key = log(u) / (w / max w)^tau``; deterministic policies rank by weight. Both become int64
sort keys so that one ``topk`` finds the lowest keys exactly, with deterministic tie breaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nexus_sidecar.engine.config import MAX_SLOTS
from nexus_sidecar.engine.hashing import uniforms
from nexus_sidecar.engine.policies.base import SlotOrder, window_mean

INT64_MAX = torch.iinfo(torch.int64).max
_SLOT_BITS = int(math.log2(MAX_SLOTS))


@dataclass
class Selection:
    """Per-slot eviction mask and the per-row number of units that had to go."""

    evict: torch.Tensor  # bool [R, W]
    need: torch.Tensor  # int64 [R]: slots that had to be removed (0 = under budget + slack)


def span_pool(weight: torch.Tensor, cand: torch.Tensor, pool: int, slot_order: SlotOrder | None = None,
              reduce: str = "max") -> torch.Tensor:
    """Pool candidate weights over ``pool`` neighbouring slots (1 = identity).

    ``reduce="max"``: a slot weighs the max of its window, so a peak shields its neighbours and a
    multi-token entity survives or goes as a whole. ``"mean"``: the average over the window's
    candidate slots (SnapKV's smoothing), which favours regions that are attended throughout.
    Protected and padding slots contribute nothing (a heavily attended sink cannot shield its
    neighbours, and the mean does not depend on how much padding a batch adds).
    """
    w = torch.where(cand & (weight > 0), weight, torch.zeros_like(weight))
    if pool <= 1:
        return w

    if reduce == "mean":
        pooled = window_mean(w, cand, pool, slot_order)
    else:
        def maxpool(x: torch.Tensor) -> torch.Tensor:
            return F.max_pool1d(x.unsqueeze(1), pool, stride=1, padding=pool // 2).squeeze(1)

        pooled = maxpool(w) if slot_order is None else slot_order.apply(maxpool, w)
    return torch.where(cand, pooled, torch.zeros_like(pooled))


def _ordered_int64(x: torch.Tensor) -> torch.Tensor:
    """Map float64 to int64 preserving order (flip the magnitude bits of negatives)."""
    bits = x.contiguous().view(torch.int64)
    return torch.where(bits < 0, bits ^ INT64_MAX, bits)


def _topk_keys(w: torch.Tensor) -> torch.Tensor:
    # Non-negative float32 bit patterns sort like their values; the low bits carry the slot
    # index, so equal weights evict the older slot first and keys never tie.
    bits = w.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    idx = torch.arange(w.shape[1], device=w.device, dtype=torch.int64)
    return (bits << _SLOT_BITS) | idx


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """``-log(-log u)``: the reservoir key's noise term (cached per token in fixed mode)."""
    return -torch.log(-torch.log(u))


def _reservoir_keys(w: torch.Tensor, cand: torch.Tensor, noise: torch.Tensor, tau: float) -> torch.Tensor:
    w64 = w.to(torch.float64)
    top = torch.where(cand, w64, torch.zeros_like(w64)).amax(dim=1, keepdim=True)
    rel = (w64 / top.clamp(min=1e-300)).clamp(min=1e-300, max=1.0)
    # log of A-Res key (negated): keep largest tau*log(w) - log(-log u); tau = 0 -> Gumbel (uniform).
    prio = noise
    if tau > 0:
        prio = prio + tau * torch.log(rel)
    return _ordered_int64(prio)


def select(
    weight: torch.Tensor,
    valid: torch.Tensor,
    protected: torch.Tensor,
    slot_pos: torch.Tensor,
    n: torch.Tensor,
    budget: torch.Tensor,
    slack: torch.Tensor,
    seed: torch.Tensor,
    group: torch.Tensor,
    call: torch.Tensor,
    *,
    tau: float | None,
    pool: int,
    block_size: int | None,
    pool_reduce: str = "max",
    noise: torch.Tensor | None = None,
    slot_order: SlotOrder | None = None,
) -> Selection:
    """Choose evictions for every row of a batch.

    ``tau=None`` (or inf) means deterministic top-K of the weight; otherwise reservoir keys with
    counter-based uniforms ``u = hash(seed, group, unit, call)`` (``noise`` may pass their
    Gumbel transform precomputed per slot, in token mode). ``block_size`` switches to
    block granularity: units are runs of slots with equal ``position // block_size``; a block
    weighs the max of its slots and is protected if any of its slots is.
    """
    rows, width = weight.shape
    need = torch.where(n > budget + slack, n - budget, torch.zeros_like(n))
    kmax = int(need.max()) if rows else 0
    if kmax == 0:
        return Selection(evict=torch.zeros_like(valid), need=need)

    cand = valid & ~protected
    w = span_pool(weight, cand, pool, slot_order, pool_reduce)
    if block_size is None:
        seg = None
        unit_w, unit_cand, unit_label = w, cand, slot_pos
        unit_size = valid.to(torch.int64)
    else:
        # Holes keep their position, so a dead slot inside a block does not split it.
        block = torch.where(slot_pos != INT64_MAX, slot_pos // block_size, torch.full_like(slot_pos, -1))
        change = torch.ones_like(block, dtype=torch.int64)
        change[:, 1:] = (block[:, 1:] != block[:, :-1]).to(torch.int64)
        seg = torch.cumsum(change, dim=1) - 1  # unit index of each slot (padding: own units)
        zeros_f = torch.zeros_like(w)
        unit_w = zeros_f.scatter_reduce(1, seg, w, reduce="amax", include_self=True)
        zeros_i = torch.zeros_like(slot_pos)
        unit_prot = zeros_i.scatter_reduce(1, seg, (protected & valid).to(torch.int64), reduce="amax") > 0
        unit_valid = zeros_i.scatter_reduce(1, seg, valid.to(torch.int64), reduce="amax") > 0
        unit_cand = unit_valid & ~unit_prot
        unit_size = torch.zeros_like(slot_pos).scatter_add(1, seg, valid.to(torch.int64))
        unit_label = torch.zeros_like(slot_pos).scatter_reduce(1, seg, block, reduce="amax")

    if tau is None or math.isinf(tau):
        keys = _topk_keys(unit_w)
    else:
        if noise is None or seg is not None:
            noise = gumbel(uniforms(seed, group, unit_label, call))
        keys = _reservoir_keys(unit_w, unit_cand, noise, tau)
    keys = torch.where(unit_cand, keys, torch.full_like(keys, INT64_MAX))

    k = min(kmax, width)
    lowest, order = torch.topk(keys, k, dim=1, largest=False, sorted=True)
    sizes = unit_size.gather(1, order)
    before = torch.cumsum(sizes, dim=1) - sizes
    chosen = (before < need.unsqueeze(1)) & (lowest != INT64_MAX)
    evict_unit = torch.zeros_like(valid).scatter(1, order, chosen)  # bool scatter: unique indices
    evict = evict_unit if seg is None else evict_unit.gather(1, seg)
    return Selection(evict=evict & valid, need=need)
