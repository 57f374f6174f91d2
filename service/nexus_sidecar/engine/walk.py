"""The Nexus walk: a truncated personalised walk over recorded attention edges.

``s_0 = d``, ``s_{r+1} = d + beta * W^T s_r``: mass a query put on token j flows on to what j
itself attended when it was the query, so a "bridge" token that the current queries barely
touch, but that strongly attended tokens depend on, gains mass.
"""

from __future__ import annotations

import torch


def resolve_edges(slot_pos: torch.Tensor, edge_pos: torch.Tensor) -> torch.Tensor:
    """Map edge target positions to slot indices; edges to evicted/absent tokens go to index W.

    ``slot_pos`` [R, W] ascending per row (padding = int64 max), ``edge_pos`` [R, W, F] (-1 = none).
    Returns int64 [R, W*F] indices into a row of width W + 1 (column W is a dump column).
    """
    rows, width = slot_pos.shape
    flat = edge_pos.reshape(rows, -1).contiguous()
    slot_pos = slot_pos.contiguous()
    idx = torch.searchsorted(slot_pos, flat)
    hit = idx.clamp(max=width - 1)
    found = (flat >= 0) & (idx < width) & (slot_pos.gather(1, hit) == flat)
    return torch.where(found, hit, torch.full_like(hit, width))


def walk(d: torch.Tensor, targets: torch.Tensor, edge_w: torch.Tensor, beta: float, iterations: int) -> torch.Tensor:
    """Run the walk on direct mass ``d`` [R, W] over edges (targets [R, W*F], weights [R, W, F]).

    scatter_add runs in index order on CPU, so a row's result does not depend on padding or on
    the other rows of the batch (batch invariance).
    """
    if iterations == 0 or beta == 0.0:
        return d
    rows, width = d.shape
    w = edge_w.reshape(rows, width, -1)
    s = d
    buf = torch.empty(rows, width + 1, dtype=d.dtype, device=d.device)
    for _ in range(iterations):
        buf.zero_()
        buf.scatter_add_(1, targets, (s.unsqueeze(-1) * w).reshape(rows, -1))
        s = d + beta * buf[:, :width]
    return s
