"""Synthetic attention streams with planted token kinds (the survival benchmark's generator).

Every position gets a kind; the attention a query pays a cached token i is
``level[kind_i] * exp(sigma[kind_i] * z)`` (z ~ N(0, 1) drawn afresh for every query), times 3
for the 8 most recent tokens (local attention), normalised over the tokens the query can see in
the cache (softmax over the cache, so evicting tokens shifts mass to the rest). Kinds:

* ``sink``    the first 4 positions, level 30 (attention sinks);
* ``noise``   level 1, sigma 0.5 (median 1, mean 1.13);
* ``strong``  level 4, sigma 0.5: every policy should keep them;
* ``subtle``  level 1, sigma 1.0: the same median as noise, a 1.46x higher mean and high
              variance, so any single step can put them below the cut (only memory finds them);
* ``bridge``  level 0.5: *less* direct attention than noise; two ``hub`` tokens (strong, level
              4) arrive 4-12 positions later and attend to their bridge 200x more than to a
              noise token (their edges carry it), so the bridge matters only through the hubs.

Queries' own rows give their outgoing edges (top-F). Everything is seeded per session.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("noise", "sink", "strong", "subtle", "bridge", "hub")
NOISE, SINK, STRONG, SUBTLE, BRIDGE, HUB = range(6)
LEVEL = torch.tensor([1.0, 30.0, 4.0, 1.0, 0.5, 4.0])
SIGMA = torch.tensor([0.5, 0.2, 0.5, 1.0, 0.5, 0.5])
RECENT_BOOST, RECENT_SPAN, HUB_BOOST = 3.0, 8, 200.0


@dataclass
class StreamSpec:
    """Shape of one synthetic stream."""

    length: int = 1024
    sinks: int = 4
    p_strong: float = 0.03
    p_subtle: float = 0.05
    p_bridge: float = 0.03


def plant_kinds(spec: StreamSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kinds per position and, per position, the bridge it is a hub of (-1 if none)."""
    g = torch.Generator().manual_seed(seed)
    T = spec.length
    r = torch.rand(T, generator=g)
    kind = torch.full((T,), NOISE, dtype=torch.int64)
    kind[r < spec.p_strong + spec.p_subtle + spec.p_bridge] = BRIDGE
    kind[r < spec.p_strong + spec.p_subtle] = SUBTLE
    kind[r < spec.p_strong] = STRONG
    kind[: spec.sinks] = SINK
    kind[T - 32 :][kind[T - 32 :] == BRIDGE] = NOISE  # a bridge needs room for its hubs
    hub_of = torch.full((T,), -1, dtype=torch.int64)
    for b in torch.nonzero(kind == BRIDGE).flatten().tolist():
        offsets = torch.randperm(9, generator=g)[:2] + 4
        for h in (b + offsets).tolist():
            if kind[h] in (NOISE, SUBTLE, STRONG) and hub_of[h] < 0:
                kind[h], hub_of[h] = HUB, b
    return kind, hub_of


def attention_rows(
    slot_pos: torch.Tensor, query_pos: torch.Tensor, kind: torch.Tensor, hub_of: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """Attention rows of the queries over the slots: [Q, W] (causal, normalised).

    ``slot_pos`` [W] (padding -1 is masked), ``query_pos`` [Q].
    """
    valid = slot_pos >= 0
    sp = slot_pos.clamp(min=0)
    k = kind[sp]
    z = torch.randn(query_pos.shape[0], slot_pos.shape[0], generator=g)
    x = LEVEL[k] * torch.exp(SIGMA[k] * z)
    dist = query_pos.unsqueeze(1) - sp.unsqueeze(0)
    x = torch.where((dist >= 0) & (dist < RECENT_SPAN), x * RECENT_BOOST, x)
    target = hub_of[query_pos].unsqueeze(1)
    x = torch.where((target >= 0) & (sp.unsqueeze(0) == target), x * HUB_BOOST, x)
    x = torch.where(valid.unsqueeze(0) & (dist >= 0), x, torch.zeros_like(x))
    return x / x.sum(1, keepdim=True)
