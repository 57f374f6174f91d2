"""The hot sessions' step state in columns: what a step checks and updates, in arrays indexed by a
session *slot*, so that the step path validates, locks and commits a batch of B sessions with a
few array operations instead of B Python objects and B ``asyncio.Lock`` awaits.

Columns: expected step (the last applied one), retained count and checksum, the widest group's
retained count (the ``n`` a step's layout is checked against), owner epoch, the in-flight flag (the
session's lock), the engine handle (its pool rows), and, as object columns, the last step's
digest and answer (idempotent retries). :class:`HotSession` is the per-session view the cold paths
use (open, resume, resync, close, checkpoints, unloading); its fields read and write the table.

A session that leaves the table (unloaded, closed, fenced) is *detached*: its view keeps the values
it had and its lock keeps working on its own, so a request that still holds the view (waiting for
its lock) sees the state it saw, never the state of the session that reuses the slot.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import numpy as np

from nexus_sidecar.engine import PolicyConfig
from nexus_sidecar.server.step_columns import StepDigest

# name -> dtype of the numeric columns.
_COLUMNS: dict[str, Any] = {
    "step": np.uint64, "count": np.int64, "checksum": np.uint64, "widest": np.int64, "epoch": np.int64,
    "in_flight": np.bool_, "handle": np.int64, "last_used": np.float64, "groups": np.int64, "fanout": np.int64,
    "checkpointed_step": np.uint64, "checkpoint_queued": np.bool_,
}
_OBJECTS = ("digest", "last_result")


class SessionTable:
    """Columns of per-session step state; slots are reused after a session leaves."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = 0
        self.col: dict[str, np.ndarray] = {n: np.zeros(0, dtype=d) for n, d in _COLUMNS.items()}
        self.obj: dict[str, np.ndarray] = {n: np.empty(0, dtype=object) for n in _OBJECTS}
        self._free: list[int] = []
        self.waiting: set[int] = set()  # slots whose lock has waiters (the batch lock leaves them alone)
        self._grow(capacity)

    def _grow(self, capacity: int) -> None:
        for n, a in self.col.items():
            self.col[n] = np.concatenate([a, np.zeros(capacity - a.shape[0], dtype=a.dtype)])
        for n, a in self.obj.items():
            self.obj[n] = np.concatenate([a, np.empty(capacity - a.shape[0], dtype=object)])
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))  # popped from the end: lowest first
        self.capacity = capacity

    def alloc(self) -> int:
        """A free slot, zeroed."""
        if not self._free:
            self._grow(max(64, 2 * self.capacity))
        slot = self._free.pop()
        for a in self.col.values():
            a[slot] = 0
        for a in self.obj.values():
            a[slot] = None
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back (its session detached first)."""
        for a in self.obj.values():
            a[slot] = None  # the answer and the digest's request arrays are not kept alive
        self._free.append(slot)

    def __len__(self) -> int:
        return self.capacity - len(self._free)

    # -- the batch lock -------------------------------------------------------------------------
    def try_lock(self, slots: np.ndarray) -> bool:
        """Lock every slot of ``slots`` at once if none is locked or awaited (else change nothing)."""
        flags = self.col["in_flight"]
        if flags[slots].any() or (self.waiting and not self.waiting.isdisjoint(slots.tolist())):
            return False
        flags[slots] = True
        return True


class SlotLock:
    """An ``asyncio.Lock`` whose locked state is the session's in-flight flag in the table (or its
    own flag once the session is detached). Same semantics as ``asyncio.Lock``: FIFO waiters, a
    cancelled waiter passes the wake-up on."""

    def __init__(self, table: SessionTable, slot: int) -> None:
        self._table: SessionTable | None = table
        self._slot = slot
        self._own = False
        self._waiters: collections.deque[asyncio.Future[bool]] | None = None

    def locked(self) -> bool:
        """Whether the lock is held."""
        return bool(self._table.col["in_flight"][self._slot]) if self._table is not None else self._own

    def _set(self, value: bool) -> None:
        if self._table is not None:
            self._table.col["in_flight"][self._slot] = value
        else:
            self._own = value

    def detach(self) -> None:
        """Keep the state in the lock itself from now on (the slot is about to be freed)."""
        if self._table is not None:
            self._own = self.locked()
            self._table.waiting.discard(self._slot)
            self._table = None

    async def acquire(self) -> bool:
        """Wait until the lock is free, then hold it."""
        if not self.locked() and (self._waiters is None or all(w.cancelled() for w in self._waiters)):
            self._set(True)
            return True
        if self._waiters is None:
            self._waiters = collections.deque()
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if self._table is not None:
            self._table.waiting.add(self._slot)
        try:
            try:
                await fut
            finally:
                self._waiters.remove(fut)
                if not self._waiters and self._table is not None:
                    self._table.waiting.discard(self._slot)
        except asyncio.CancelledError:
            if not self.locked():
                self._wake_up_first()
            raise
        self._set(True)
        return True

    def release(self) -> None:
        """Release the lock (and wake the first waiter)."""
        if not self.locked():
            raise RuntimeError("Lock is not acquired.")
        self._set(False)
        self._wake_up_first()

    def wake(self) -> None:
        """Wake the first waiter after the lock was released by clearing its flag in the table (the
        step path's batch release)."""
        self._wake_up_first()

    def _wake_up_first(self) -> None:
        if not self._waiters:
            return
        fut = self._waiters[0]
        if not fut.done():
            fut.set_result(True)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _Column:
    """A HotSession field kept in the table while the session is attached."""

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, hs: HotSession | None, owner: type) -> Any:
        if hs is None:
            return self
        if hs.table is None:
            return hs.detached[self.name]
        if self.kind is object:
            return hs.table.obj[self.name][hs.slot]
        return self.kind(hs.table.col[self.name][hs.slot])

    def __set__(self, hs: HotSession, value: Any) -> None:
        if hs.table is None:
            hs.detached[self.name] = value
        elif self.kind is object:
            hs.table.obj[self.name][hs.slot] = value
        else:
            hs.table.col[self.name][hs.slot] = value


class HotSession:
    """A session whose state is in the engine's pool: the cold paths' view of its table row, plus
    what only the cold paths use (checkpoint bookkeeping, the checkpoint writer's lock)."""

    step = _Column(int)  # the last applied step
    count = _Column(int)  # retained slots, summed over groups
    checksum = _Column(int)  # positions_checksum of retained positions, summed over groups
    widest = _Column(int)  # retained slots of the widest group (what a step's layout is checked against)
    epoch = _Column(int)  # the owner epoch this replica claimed (server/ownership.py)
    handle = _Column(int)  # the engine's session handle
    last_used = _Column(float)
    groups = _Column(int)  # of the config (constant)
    fanout = _Column(int)
    checkpointed_step = _Column(int)  # the step of the last checkpoint written (0: none)
    checkpoint_queued = _Column(bool)  # a cadence checkpoint is spawned and not finished
    digest = _Column(object)  # StepDigest of the last applied step (idempotent retries)
    last_result = _Column(object)  # its Answer (None: nothing to answer a retry with)

    def __init__(self, table: SessionTable, tenant: str, session_id: str, handle: int, cfg: PolicyConfig, *,
                 step: int = 0, checksum: int = 0, count: int = 0, widest: int = 0, digest: StepDigest | None = None,
                 last_result: Any = None, checkpointed_step: int = 0, stored: bool = False, epoch: int = 0) -> None:
        self.table: SessionTable | None = table
        self.slot = table.alloc()
        self.detached: dict[str, Any] = {}
        self.tenant, self.session_id, self.cfg = tenant, session_id, cfg
        self.handle, self.step, self.checksum, self.count, self.widest = handle, step, checksum, count, widest
        self.digest = digest if digest is not None else StepDigest()
        self.last_result, self.epoch, self.last_used = last_result, epoch, time.monotonic()
        self.groups, self.fanout = cfg.groups, cfg.fanout
        self.checkpointed_step, self.checkpoint_queued = checkpointed_step, False
        self.stored = stored  # a checkpoint of it is in the store (else unloading it would lose it)
        self.lock = SlotLock(table, self.slot)
        self.writing = asyncio.Lock()  # held from capture to store answer
        self.delta_base: Any = None  # the full checkpoint this replica wrote last (deltas go against it)

    @property
    def dirty(self) -> bool:
        """True when steps were applied since the last successful checkpoint (or none was written)."""
        return self.step > self.checkpointed_step or not self.stored

    def detach(self) -> None:
        """Leave the table: the view keeps its last values, the lock its state; the slot is freed."""
        table = self.table
        if table is None:
            return
        values = {name: getattr(self, name) for name in (*_COLUMNS, *_OBJECTS) if name != "in_flight"}
        self.lock.detach()
        self.table = None
        self.detached = values
        table.free(self.slot)

    def __repr__(self) -> str:
        return f"HotSession({self.tenant!r}, {self.session_id!r}, step={self.step}, slot={self.slot})"
