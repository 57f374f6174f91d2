"""The device-resident session pool: the state of many rows in a few padded tensors.

Sessions own rows (one per layer group). A batched call gathers its rows with one indexing op
per field and writes them back the same way, so advancing 64 sessions costs the same number of
kernel launches as advancing one. Rows and width grow by doubling when needed.
"""

from __future__ import annotations

import torch

from nexus_sidecar.engine.selection import INT64_MAX
from nexus_sidecar.engine.step import RowParams, RowState

_PARAMS = ("budget", "slack", "sinks", "recent", "seed", "group", "call")


class SessionPool:
    """Rows of sessions that share an edge fan-out (the F dimension of the edge tensors)."""

    def __init__(self, fanout: int, device: torch.device, rows: int = 16, width: int = 64) -> None:
        self.fanout = fanout
        self.device = device
        self.rows = 0
        self.width = 0
        self._free: list[int] = []
        self.pos = torch.empty(0, 0, dtype=torch.int64, device=device)
        self.age = torch.empty(0, 0, dtype=torch.int32, device=device)
        self.memory = torch.empty(0, 0, dtype=torch.float32, device=device)
        self.edge_pos = torch.empty(0, 0, fanout, dtype=torch.int32, device=device)  # int32 halves memory
        self.edge_w = torch.empty(0, 0, fanout, dtype=torch.float32, device=device)
        self.count = torch.empty(0, dtype=torch.int64, device=device)
        self.params = {name: torch.empty(0, dtype=torch.int64, device=device) for name in _PARAMS}
        self._grow(rows, width)

    # -- allocation ---------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int]:
        """Reserve ``n`` rows (reset to empty) and return their ids."""
        while len(self._free) < n:
            self._grow(self.rows * 2, self.width)
        rows, self._free = self._free[:n], self._free[n:]
        self._reset(torch.tensor(rows, device=self.device))
        return rows

    def free(self, rows: list[int]) -> None:
        """Give rows back (their content is reset on the next alloc)."""
        self._free.extend(rows)
        self._free.sort()

    def ensure_width(self, width: int) -> None:
        """Make every row at least ``width`` slots wide."""
        if width > self.width:
            self._grow(self.rows, max(width, self.width * 2))

    def _grow(self, rows: int, width: int) -> None:
        def grown(x: torch.Tensor, fill: float | int) -> torch.Tensor:
            out = torch.full((rows, width, *x.shape[2:]), fill, dtype=x.dtype, device=self.device)
            out[: x.shape[0], : x.shape[1]] = x
            return out

        self.pos, self.age = grown(self.pos, INT64_MAX), grown(self.age, 0)
        self.memory = grown(self.memory, 0.0)
        self.edge_pos, self.edge_w = grown(self.edge_pos, -1), grown(self.edge_w, 0.0)
        count = torch.zeros(rows, dtype=torch.int64, device=self.device)
        count[: self.count.shape[0]] = self.count
        self.count = count
        for name, val in self.params.items():
            new = torch.zeros(rows, dtype=torch.int64, device=self.device)
            new[: val.shape[0]] = val
            self.params[name] = new
        self._free.extend(range(self.rows, rows))
        self.rows, self.width = rows, width

    def _reset(self, rows: torch.Tensor) -> None:
        self.pos[rows] = INT64_MAX
        self.age[rows] = 0
        self.memory[rows] = 0.0
        self.edge_pos[rows] = -1
        self.edge_w[rows] = 0.0
        self.count[rows] = 0
        for val in self.params.values():
            val[rows] = 0

    # -- batched access -----------------------------------------------------------------------
    def set_params(self, rows: torch.Tensor, **values: int) -> None:
        """Set per-row parameters (budget, slack, sinks, recent, seed, group, call)."""
        for name, value in values.items():
            self.params[name][rows] = value

    def row_params(self, rows: torch.Tensor) -> RowParams:
        """Per-row parameters of a batch."""
        return RowParams(**{name: self.params[name][rows] for name in _PARAMS})

    def gather(self, rows: torch.Tensor, width: int) -> RowState:
        """State of ``rows`` narrowed to the first ``width`` slots (``width`` <= pool width)."""
        w = min(width, self.width)
        return RowState(
            pos=self.pos[rows, :w], age=self.age[rows, :w], memory=self.memory[rows, :w],
            edge_pos=self.edge_pos[rows, :w].to(torch.int64), edge_w=self.edge_w[rows, :w],
            count=self.count[rows],
        )

    def write(self, rows: torch.Tensor, state: RowState) -> None:
        """Store a batch's new state; slots beyond its width were padding and stay padding."""
        w = state.pos.shape[1]
        self.ensure_width(w)
        self.pos[rows, :w] = state.pos
        self.age[rows, :w] = state.age
        self.memory[rows, :w] = state.memory
        self.edge_pos[rows, :w] = state.edge_pos.to(torch.int32)
        self.edge_w[rows, :w] = state.edge_w
        self.count[rows] = state.count
        self.params["call"][rows] += 1

    def load_rows(self, rows: list[int], pos: list[torch.Tensor], age: list[torch.Tensor],
                  memory: list[torch.Tensor], edge_pos: list[torch.Tensor], edge_w: list[torch.Tensor]) -> None:
        """Fill rows from per-group tensors (restore from a checkpoint)."""
        self.ensure_width(max((p.numel() for p in pos), default=0))
        for r, p, a, m, ep, ew in zip(rows, pos, age, memory, edge_pos, edge_w, strict=True):
            n = p.numel()
            self.pos[r, :n] = p.to(self.device)
            self.age[r, :n] = a.to(self.device)
            self.memory[r, :n] = m.to(self.device)
            self.edge_pos[r, :n] = ep.to(self.device)
            self.edge_w[r, :n] = ew.to(self.device)
            self.count[r] = n
