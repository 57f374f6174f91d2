"""The device-resident session pool: the state of many rows in a few padded tensors.

A row (one layer group of one session) is an *arena*: tokens are appended at the right and
never move while they live; an evicted token leaves a hole (``alive`` False). Edges are stored
as arena columns, so a call reads the edge tensors but never rewrites them. A row is compacted
(holes squeezed out, edges remapped) only once its holes exceed an allowance, which amortises
the only O(slots x fan-out) write over many calls.

A batch whose rows are contiguous, in batch order, is accessed through views (no copy of the
edge tensors); the engine makes a batch so with :meth:`SessionPool.make_contiguous` (rows by batch
affinity: sessions that travel together end up side by side, whatever order they were opened in).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

INT64_MAX = torch.iinfo(torch.int64).max
_PARAMS = ("budget", "slack", "sinks", "recent", "seed", "group", "call")
# name -> (dtype, fill) for per-slot fields; edge fields have a trailing fan-out dimension.
_SLOT_FIELDS: dict[str, tuple[torch.dtype, float | int | bool]] = {
    "pos": (torch.int64, INT64_MAX),
    "alive": (torch.bool, False),
    "birth": (torch.int64, 0),  # call index at which the token entered (age = call - birth)
    "memory": (torch.float32, 0.0),
    "gumbel": (torch.float64, 0.0),  # cached -log(-log u) of the token's fixed-mode uniform
}
_EDGE_FIELDS: dict[str, tuple[torch.dtype, float | int]] = {
    "edge_idx": (torch.int64, 0),  # arena column of the target; "no edge" = own column, weight 0
    "edge_w": (torch.float32, 0.0),
}


@functools.cache
def slot_bytes(fanout: int) -> int:
    """Bytes one arena column of one row occupies (every slot and edge field) at this fan-out."""
    per = sum(torch.empty(0, dtype=d).element_size() for d, _ in _SLOT_FIELDS.values())
    return per + fanout * sum(torch.empty(0, dtype=d).element_size() for d, _ in _EDGE_FIELDS.values())


@dataclass(frozen=True)
class PoolShape:
    """The size of a pool at one moment: an immutable copy any thread may read (see
    ``Engine.pool_bytes``), while the pool itself belongs to the engine thread."""

    fanout: int
    width: int
    rows: int
    free: int  # rows not reserved by a session

    def nbytes(self, rows: int | None = None) -> int:
        """Bytes of the per-slot tensors at ``rows`` rows (default: as allocated)."""
        return (self.rows if rows is None else rows) * self.width * slot_bytes(self.fanout)

    def rows_after_alloc(self, n: int) -> int:
        """Row capacity after reserving ``n`` more rows (the pool doubles when it runs out)."""
        rows, free = self.rows, self.free
        while free < n:
            free += rows
            rows *= 2
        return rows


@dataclass
class Rows:
    """A batch's rows: a slice when contiguous (views, writes in place), else an index."""

    index: torch.Tensor  # int64 [R]
    first: int | None  # set when the rows are first..first+R-1

    def get(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """Rows of ``x`` narrowed to ``width`` columns (a view when contiguous)."""
        if self.first is not None:
            return x[self.first : self.first + self.index.numel(), :width]
        return x[self.index, :width]

    def put(self, x: torch.Tensor, value: torch.Tensor) -> None:
        """Write ``value`` ([R, w, ...]) into the first w columns of the rows of ``x``."""
        w = value.shape[1]
        if self.first is not None:
            dst = x[self.first : self.first + self.index.numel(), :w]
            if dst.data_ptr() != value.data_ptr():
                dst.copy_(value)
        else:
            x[self.index, :w] = value


class SessionPool:
    """Rows of sessions that share an edge fan-out (the F dimension of the edge tensors).

    Not thread-safe: only the engine that owns it reads or changes it, on the engine's one thread;
    other threads see its size through the engine's published :class:`PoolShape` copies.
    """

    def __init__(self, fanout: int, device: torch.device, rows: int = 16, width: int = 64) -> None:
        self.fanout = fanout
        self.device = device
        self.rows = 0
        self.width = 0
        self._free: list[int] = []
        self.slot: dict[str, torch.Tensor] = {n: torch.empty(0, 0, dtype=d, device=device)
                                              for n, (d, _) in _SLOT_FIELDS.items()}
        self.edge: dict[str, torch.Tensor] = {n: torch.empty(0, 0, fanout, dtype=d, device=device)
                                              for n, (d, _) in _EDGE_FIELDS.items()}
        self.used = torch.empty(0, dtype=torch.int64, device=device)  # arena columns in use
        self.count = torch.empty(0, dtype=torch.int64, device=device)  # live tokens
        self.params = {name: torch.empty(0, dtype=torch.int64, device=device) for name in _PARAMS}
        self._grow(rows, width)

    # -- size -------------------------------------------------------------------------------------
    def nbytes(self, rows: int | None = None, width: int | None = None) -> int:
        """Bytes of the per-slot tensors at ``rows`` x ``width`` (default: as allocated now)."""
        return (self.rows if rows is None else rows) * (self.width if width is None else width) * \
            slot_bytes(self.fanout)

    def shape(self) -> PoolShape:
        """An immutable copy of the pool's size (rows, width, free rows)."""
        return PoolShape(self.fanout, self.width, self.rows, len(self._free))

    def rows_after_alloc(self, n: int) -> int:
        """Row capacity after reserving ``n`` more rows (the pool doubles when it runs out)."""
        return self.shape().rows_after_alloc(n)

    def width_after(self, width: int) -> int:
        """Arena width after :meth:`ensure_width` ``(width)``."""
        return self.width if width <= self.width else max(width + width // 4 + 64, self.width * 2)

    def repack(self, live: list[int], rows: int, width: int) -> None:
        """Move rows ``live`` (in that order) to rows 0..len(live)-1 of a ``rows`` x ``width`` pool.

        Arena columns are kept (edges index columns within a row), so ``width`` must cover every
        live row's used columns. Frees the memory of closed rows and of width no row needs.
        """
        idx = torch.tensor(live, dtype=torch.int64, device=self.device)
        n, keep_w = len(live), min(width, self.width)

        def packed(x: torch.Tensor, fill: float | int | bool) -> torch.Tensor:
            out = torch.full((rows, width, *x.shape[2:]), fill, dtype=x.dtype, device=self.device)
            out[:n, :keep_w] = x[idx, :keep_w]
            return out

        for name, (_, fill) in _SLOT_FIELDS.items():
            self.slot[name] = packed(self.slot[name], fill)
        for name, (_, fill) in _EDGE_FIELDS.items():
            self.edge[name] = packed(self.edge[name], fill)
        for name in ("used", "count"):
            new = torch.zeros(rows, dtype=torch.int64, device=self.device)
            new[:n] = getattr(self, name)[idx]
            setattr(self, name, new)
        for name, val in self.params.items():
            new = torch.zeros(rows, dtype=torch.int64, device=self.device)
            new[:n] = val[idx]
            self.params[name] = new
        self._free = list(range(n, rows))
        self.rows, self.width = rows, width

    def copy_rows(self, src: SessionPool, src_rows: list[int], dst_rows: list[int], used: int) -> None:
        """Copy rows of ``src`` (their first ``used`` arena columns, holes included, and their
        counters and parameters) into ``dst_rows`` of this pool, which must be at least as wide."""
        s = torch.tensor(src_rows, dtype=torch.int64, device=self.device)
        d = torch.tensor(dst_rows, dtype=torch.int64, device=self.device)
        w = min(max(used, 0), src.width)
        for name in self.slot:
            self.slot[name][d, :w] = src.slot[name][s, :w]
        for name in self.edge:
            self.edge[name][d, :w] = src.edge[name][s, :w]
        self.used[d] = src.used[s]
        self.count[d] = src.count[s]
        for name, val in self.params.items():
            val[d] = src.params[name][s]

    # -- allocation ---------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int]:
        """Reserve ``n`` rows (reset to empty) and return their ids (ascending, contiguous if possible)."""
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
        """Make every row at least ``width`` arena columns wide."""
        if width > self.width:
            # Headroom: a prefill of N tokens followed by decode steps must not regrow (and copy
            # the whole pool) on the very next call.
            self._grow(self.rows, max(width + width // 4 + 64, self.width * 2))

    def _grow(self, rows: int, width: int) -> None:
        def grown(x: torch.Tensor, fill: float | int | bool) -> torch.Tensor:
            out = torch.full((rows, width, *x.shape[2:]), fill, dtype=x.dtype, device=self.device)
            out[: x.shape[0], : x.shape[1]] = x
            return out

        for n, (_, fill) in _SLOT_FIELDS.items():
            self.slot[n] = grown(self.slot[n], fill)
        for n, (_, fill) in _EDGE_FIELDS.items():
            self.edge[n] = grown(self.edge[n], fill)
        for name in ("used", "count"):
            old = getattr(self, name)
            new = torch.zeros(rows, dtype=torch.int64, device=self.device)
            new[: old.shape[0]] = old
            setattr(self, name, new)
        for name, val in self.params.items():
            new = torch.zeros(rows, dtype=torch.int64, device=self.device)
            new[: val.shape[0]] = val
            self.params[name] = new
        self._free.extend(range(self.rows, rows))
        self._free.sort()
        self.rows, self.width = rows, width

    def _reset(self, rows: torch.Tensor) -> None:
        for n, (_, fill) in _SLOT_FIELDS.items():
            self.slot[n][rows] = fill
        for n, (_, fill) in _EDGE_FIELDS.items():
            self.edge[n][rows] = fill
        self.used[rows] = 0
        self.count[rows] = 0
        for val in self.params.values():
            val[rows] = 0

    def make_contiguous(self, rows: list[int]) -> dict[int, int]:
        """Move rows so that ``rows`` (in that order) occupy one block; returns old -> new row for
        every row that moved, the batch's and any other row displaced from the block (free rows
        included, and the free list follows them). Contents move whole, so nothing else changes.

        The block is the one that costs the fewest row copies, where displacing a row of another
        session costs more than moving the whole batch: that row may belong to another batch that
        would then move back on its next step (ping-pong). So a block of the batch's own rows and
        free rows is chosen whenever one exists.
        """
        n = len(rows)
        if n <= 1 or rows == list(range(rows[0], rows[0] + n)):
            return {}
        status = np.full(self.rows, 2, dtype=np.int8)  # 2 = another session's row, 1 = the batch's, 0 = free
        status[self._free] = 0
        status[rows] = 1
        busy = np.concatenate([[0], np.cumsum(status == 2)])
        starts = np.arange(self.rows - n + 1)
        offsets = np.asarray(rows) - np.arange(n)  # the block start at which each row is already in place
        in_place = np.zeros(self.rows - n + 1, dtype=np.int64)
        ok = (offsets >= 0) & (offsets <= self.rows - n)
        np.add.at(in_place, offsets[ok], 1)
        cost = (n - in_place) + (n + 1) * (busy[starts + n] - busy[starts])
        a = int(np.argmin(cost))
        batch = set(rows)
        window = range(a, a + n)
        new_of = {r: a + i for i, r in enumerate(rows) if r != a + i}
        displaced = sorted(t for t in window if t not in batch)
        vacated = sorted(r for r in rows if not a <= r < a + n)
        new_of.update(zip(displaced, vacated, strict=True))
        src = torch.tensor(list(new_of), dtype=torch.int64, device=self.device)
        dst = torch.tensor(list(new_of.values()), dtype=torch.int64, device=self.device)
        for x in (*self.slot.values(), *self.edge.values(), self.used, self.count, *self.params.values()):
            x[dst] = x[src]  # the right side is gathered first: a permutation is safe
        self._free = sorted(new_of.get(f, f) for f in self._free)
        return new_of

    # -- access -------------------------------------------------------------------------------
    def rows_of(self, rows: list[int]) -> Rows:
        """A :class:`Rows` handle for a batch (contiguous rows become views)."""
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        first = rows[0] if rows and rows == list(range(rows[0], rows[0] + len(rows))) else None
        return Rows(index, first)

    def set_params(self, rows: torch.Tensor, **values: int) -> None:
        """Set per-row parameters (budget, slack, sinks, recent, seed, group, call)."""
        for name, value in values.items():
            self.params[name][rows] = value

    def compact(self, rows: torch.Tensor) -> None:
        """Squeeze the holes out of ``rows`` and remap their edges (edges to dead tokens vanish)."""
        if rows.numel() == 0:
            return
        width = self.width
        alive = self.slot["alive"][rows]
        dest = torch.where(alive, torch.cumsum(alive, dim=1) - 1, width)  # width = dump column
        eidx, ew = self.edge["edge_idx"][rows], self.edge["edge_w"][rows]
        target_alive = alive.gather(1, eidx.reshape(rows.numel(), -1)).reshape(eidx.shape)
        live_edge = target_alive & (ew > 0)
        moved_self = dest.unsqueeze(-1).expand_as(eidx)
        # Live edges follow their target; the others become the "no edge" convention (own column).
        new_idx = torch.where(live_edge, dest.gather(1, eidx.reshape(rows.numel(), -1)).reshape(eidx.shape),
                              moved_self)
        new_w = torch.where(live_edge, ew, torch.zeros_like(ew))

        def move(x: torch.Tensor, fill: float | int | bool) -> torch.Tensor:
            out = torch.full((rows.numel(), width + 1, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
            index = dest if x.dim() == 2 else dest.unsqueeze(-1).expand_as(x)
            out.scatter_(1, index, x)
            return out[:, :width]

        for n, (_, fill) in _SLOT_FIELDS.items():
            self.slot[n][rows] = move(self.slot[n][rows], fill)
        # Dead tokens' edges land in the dump column; freed columns get the fresh-row fill.
        self.edge["edge_idx"][rows] = move(new_idx, 0)
        self.edge["edge_w"][rows] = move(new_w, 0.0)
        self.used[rows] = self.count[rows]
