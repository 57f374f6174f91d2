"""Durability and ownership of sessions in a shared store: owner epochs and durable close.

A replica that resumes (or opens, or resyncs) a session *claims* it: the store's owner epoch of
that session goes up by one and the replica remembers the value. Every checkpoint carries it and
the store refuses a write with an older epoch (:class:`~nexus_sidecar.server.stores.Fenced`), so
a replica that lost the session can never write it again. With a store shared by replicas
(Redis), every Step also reads the epochs of its sessions (one pipelined round trip) before
anything is computed: a replica holding an older epoch drops its hot copy and answers ABORTED
instead of answering for a session it no longer owns.

A close first bumps the epoch and drops the stored state in one atomic store operation (the
tombstone); only then is the hot copy released. When the store cannot be reached the close
fails (UNAVAILABLE) and the session stays as it was: a closed session never comes back, and a
close that did not happen is reported as such.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from nexus_sidecar.server.metrics import Metrics
from nexus_sidecar.server.stores import Fenced, StateStore, StoredState, StoreUnavailable, bounded

log = logging.getLogger("nexus_sidecar.ownership")


class Owned(Protocol):
    """What ownership needs of a hot session."""

    tenant: str
    session_id: str
    epoch: int


class Ownership:
    """Owner epochs and durable deletes over one store."""

    def __init__(self, store: StateStore, metrics: Metrics, fence_timeout_s: float = 0.2,
                 fence_backoff_s: float = 1.0) -> None:
        self.store = store
        self.metrics = metrics
        self.shared = bool(getattr(store, "shared", False))
        self.fence_timeout_s = fence_timeout_s
        self.fence_backoff_s = fence_backoff_s
        self._skip_until = 0.0  # after a failed epoch read: no reads until then (a hung store)

    async def claim(self, tenant: str, session_id: str) -> tuple[int, StoredState | None]:
        """A new owner epoch for this replica, with the stored state (None when there is none)."""
        return await self.store.claim(tenant, session_id)

    async def stale(self, tenant: str, sessions: list[Owned]) -> list[Owned]:
        """The sessions whose owner epoch in the store is no longer this replica's.

        Only with a shared store. When the store cannot be reached the check is skipped (the
        session is served from hot state, ``nexus_degraded`` = 1): writes stay fenced anyway.
        """
        if not self.shared or not sessions or time.monotonic() < self._skip_until:
            return []
        try:
            # Bounded well below the store timeout, and skipped for a while after a failure: a hung
            # store must not stall every step by its socket timeout.
            async with bounded(self.fence_timeout_s):  # cut short: outcome "unavailable", not "error"
                current = await self.store.epochs(tenant, [s.session_id for s in sessions])
        except (StoreUnavailable, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                self.metrics.degraded.set(1)
            self._skip_until = time.monotonic() + self.fence_backoff_s
            log.warning("owner epochs of %d sessions unreadable (%s): serving from hot state for %.1f s",
                        len(sessions), exc or "timeout", self.fence_backoff_s)
            return []
        return [s for s, e in zip(sessions, current, strict=True) if e is not None and e != s.epoch]

    async def put(self, hs: Owned, step: int, blob: bytes, base: int | None = None) -> bool | None:
        """Checkpoint with the owner epoch: True written, False CAS conflict (or, for a delta with
        ``base``, the stored full checkpoint is not its base), None fenced."""
        try:
            written = await self.store.put(hs.tenant, hs.session_id, step, blob, epoch=hs.epoch, base=base)
        except Fenced as exc:
            log.warning("checkpoint of %s/%s at step %d fenced: %s", hs.tenant, hs.session_id, step, exc)
            return None
        return written

    async def close(self, tenant: str, session_id: str) -> None:
        """Durable close: the tombstone is written, or StoreUnavailable is raised (nothing changed)."""
        await self.store.delete(tenant, session_id)
