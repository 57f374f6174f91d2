"""The Nexus walk: a truncated personalised walk over recorded attention edges.

``s_0 = d``, ``s_{r+1} = d + beta * W^T s_r``: mass a query put on token j flows on to what j
itself attended when it was the query, so a "bridge" token that the current queries barely
touch, but that strongly attended tokens depend on, gains mass.
"""

from __future__ import annotations

import torch


def walk(d: torch.Tensor, alive: torch.Tensor, edge_idx: torch.Tensor, edge_w: torch.Tensor, beta: float,
         iterations: int) -> torch.Tensor:
    """Run the walk on direct mass ``d`` [R, W] over edges (arena columns [R, W, F], weights).

    Dead slots neither send nor keep mass. ``scatter_add_`` accumulates in index order on CPU, so
    a row's result does not depend on padding or on the other rows of the batch (batch
    invariance); "no edge" is a zero-weight self edge, which adds an exact +0. (On CUDA the
    scatter uses atomics: sums may differ in the last bits between runs.)
    """
    if iterations == 0 or beta == 0.0:
        return d
    rows, width = d.shape
    # Row-local targets viewed as [R, W*F] without a copy (each row's [W, F] block is
    # contiguous even when the arena is wider than this call): no per-call index arithmetic.
    index = edge_idx.reshape(rows, -1)
    w = edge_w.reshape(rows, width, -1)
    s = d
    out = torch.empty(rows, width, dtype=d.dtype, device=d.device)
    for _ in range(iterations):
        out.zero_()
        src = torch.where(alive, s, 0.0).unsqueeze(-1) * w
        out.scatter_add_(1, index, src.reshape(rows, -1))
        s = d + beta * out
    return torch.where(alive, s, 0.0)
