"""In-process state store: the embedded default when no Redis is configured."""

from __future__ import annotations

import time
from collections.abc import Callable

from nexus_sidecar.server.stores.base import (
    Fenced,
    OnOp,
    StoredState,
    StoreError,
    observe,
    validate_id,
    validate_step,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    """Dict-backed ``StateStore`` with the same CAS and sliding-TTL semantics as ``RedisStore``.

    Every operation runs without an ``await`` between read and write, so on one event loop
    the compare-and-set is atomic without a lock. State does not survive the process.
    """

    def __init__(
        self,
        *,
        ttl_seconds: float | None = None,
        on_op: OnOp | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``ttl_seconds``: sliding expiry refreshed by every get/put (None = never expire).

        ``clock`` is injectable so tests can move time without sleeping.
        """
        if ttl_seconds is not None and not ttl_seconds > 0:
            raise StoreError(f"ttl_seconds: must be > 0 or None, got {ttl_seconds}")
        self._ttl = ttl_seconds
        self._on_op = on_op
        self._clock = clock
        # (tenant, session) -> (state, expiry deadline or None)
        self._data: dict[tuple[str, str], tuple[StoredState, float | None]] = {}
        # (tenant, session) -> step of the stored full blob (what a delta must be taken against)
        self._full: dict[tuple[str, str], int] = {}
        # Owner epochs (also the tombstones of closed sessions). Kept for the process's life: an
        # int per session ever claimed.
        self._epochs: dict[tuple[str, str], int] = {}
        self._closed = False

    shared = False  # one process: no other replica writes here, so steps skip the epoch check

    def _deadline(self) -> float | None:
        return None if self._ttl is None else self._clock() + self._ttl

    def _live(self, key: tuple[str, str]) -> StoredState | None:
        """The entry under ``key`` unless it expired (expired entries are dropped lazily)."""
        entry = self._data.get(key)
        if entry is None:
            return None
        state, deadline = entry
        if deadline is not None and self._clock() >= deadline:
            del self._data[key]
            return None
        return state

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    def ttl_remaining(self, tenant: str, session_id: str) -> float | None:
        """Seconds until the entry expires (None without TTL or when absent); for tests/admin."""
        key = (validate_id("tenant", tenant, allow_colon=False), validate_id("session_id", session_id))
        if self._live(key) is None:
            return None
        deadline = self._data[key][1]
        return None if deadline is None else deadline - self._clock()

    async def get(self, tenant: str, session_id: str) -> StoredState | None:
        """Return the stored state and refresh its TTL, or None."""
        key = (validate_id("tenant", tenant, allow_colon=False), validate_id("session_id", session_id))
        with observe(self._on_op, "get") as outcome:
            self._check_open()
            state = self._live(key)
            if state is None:
                outcome[0] = "miss"
                return None
            self._data[key] = (state, self._deadline())
            return state

    async def put(self, tenant: str, session_id: str, step: int, blob: bytes, epoch: int | None = None,
                  base: int | None = None) -> bool:
        """Compare-and-set: write iff nothing is stored or the stored step is < ``step``, and
        (``epoch`` given) the owner epoch is still ``epoch`` (else :class:`Fenced`); with ``base``,
        a delta written iff the stored full blob is the one of step ``base``."""
        key = (validate_id("tenant", tenant, allow_colon=False), validate_id("session_id", session_id))
        validate_step(step)
        if base is not None:
            validate_step(base)
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise StoreError(f"blob: must be bytes, got {type(blob).__name__}")
        with observe(self._on_op, "put") as outcome:
            self._check_open()
            owner = self._epochs.get(key)
            if epoch is not None and owner is not None and owner != epoch:
                outcome[0] = "fenced"
                raise Fenced(f"session {session_id!r} is owned by epoch {owner}, this writer holds {epoch}")
            current = self._live(key)
            if current is not None and current.step >= step:
                # Same sliding-TTL rule as Redis: a put touches the entry even when refused.
                self._data[key] = (current, self._deadline())
                if current.step == step and epoch is not None and owner == epoch:
                    outcome[0] = "conflict_self"  # this writer's own earlier write of this step
                    return True
                outcome[0] = "conflict"
                return False
            if base is not None:
                if current is None or self._full.get(key) != base:
                    outcome[0] = "base"
                    return False
                self._data[key] = (StoredState(step=step, blob=current.blob, delta=bytes(blob)), self._deadline())
                return True
            self._data[key] = (StoredState(step=step, blob=bytes(blob)), self._deadline())
            self._full[key] = step
            return True

    async def delete(self, tenant: str, session_id: str) -> None:
        """Remove the session's state (no error when absent)."""
        key = (validate_id("tenant", tenant, allow_colon=False), validate_id("session_id", session_id))
        with observe(self._on_op, "delete"):
            self._check_open()
            self._data.pop(key, None)
            self._full.pop(key, None)
            self._epochs[key] = self._epochs.get(key, 0) + 1  # the tombstone: earlier writers are fenced

    async def claim(self, tenant: str, session_id: str) -> tuple[int, StoredState | None]:
        """Take ownership: a new owner epoch, with the stored state (refreshing its TTL) or None."""
        key = (validate_id("tenant", tenant, allow_colon=False), validate_id("session_id", session_id))
        with observe(self._on_op, "claim") as outcome:
            self._check_open()
            epoch = self._epochs[key] = self._epochs.get(key, 0) + 1
            state = self._live(key)
            if state is None:
                outcome[0] = "miss"
                return epoch, None
            self._data[key] = (state, self._deadline())
            return epoch, state

    async def epochs(self, tenant: str, session_ids: list[str]) -> list[int | None]:
        """The current owner epoch of each session."""
        with observe(self._on_op, "epochs"):
            self._check_open()
            return [self._epochs.get((tenant, sid)) for sid in session_ids]

    async def list(self, tenant: str) -> list[str]:
        """Sorted session ids with live state for ``tenant``."""
        validate_id("tenant", tenant, allow_colon=False)
        with observe(self._on_op, "list"):
            self._check_open()
            return sorted(s for (t, s) in list(self._data) if t == tenant and self._live((t, s)))

    async def ping(self) -> None:
        """Always answers while open."""
        with observe(self._on_op, "ping"):
            self._check_open()

    async def close(self) -> None:
        """Drop all state."""
        self._data.clear()
        self._full.clear()
        self._closed = True
