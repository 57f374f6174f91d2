"""Unloading and reaping: hot sessions leave the engine's pool.

A session leaves when it is closed, when another replica fenced it (a newer owner epoch), when it
idled past ``idle_session_s`` (the reaper), or when the pool needs room for an allocation (least
recently used first, checkpointed before it goes). Leaving frees its engine rows and its table slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection

from nexus_sidecar.server.session_table import HotSession

log = logging.getLogger("nexus_sidecar.sessions")

# How long make_room waits for other RPCs' in-flight sessions to become unloadable before it
# refuses, and how often it looks again: a step takes milliseconds to a few tens of them.
ROOM_WAIT_S = 0.5
ROOM_POLL_S = 0.005


class Unloading:
    """The unloading room of :class:`~nexus_sidecar.server.sessions.SessionManager`, whose state
    (engine, table, hot sessions, store, settings, metrics) and other rooms its methods use."""

    async def _unload(self, hs: HotSession) -> None:
        key = (hs.tenant, hs.session_id)
        if self._hot.get(key) is hs:
            del self._hot[key]
            try:
                await self.on_engine(self.engine.close, hs.handle)
            finally:
                hs.detach()  # its table slot is free; the view keeps its last values
            self.metrics.sessions_open.labels(hs.tenant).set(len(self.hot_sessions(hs.tenant)))
            self._series(hs).retained.dec(hs.count)

    async def _drop_fenced(self, hs: HotSession) -> None:
        """Release a hot copy another replica owns now (no checkpoint: it would be refused)."""
        if self._hot.get((hs.tenant, hs.session_id)) is hs:
            await self._unload(hs)
            self.metrics.sessions_fenced.labels(hs.tenant).inc()
            log.warning("dropped session %s/%s at step %d: another replica owns it now (newer epoch)", hs.tenant,
                        hs.session_id, hs.step)

    async def make_room(self, over: Callable[[], int], what: str, mine: Collection[HotSession] = ()) -> None:
        """Unload idle sessions (checkpointed, least recently used first) until ``over()`` is 0.

        ``over()`` says how many bytes the pending allocation would take the pool over its budget.
        Sessions whose lock is held (stepping now, or ``mine``: part of the caller's RPC) are never
        picked. When nothing idle is left but other RPCs' sessions are stepping, it waits for them
        (they are idle once their step ends) for at most ``ROOM_WAIT_S``: a pool that is full only
        for the length of a step must not refuse. Then it raises the pool budget's RESOURCE_EXHAUSTED.
        """
        need = over()
        if not need:
            return
        own = {id(hs) for hs in mine}
        give_up_at: float | None = None
        while True:
            idle = sorted((hs for hs in self._hot.values() if not hs.lock.locked()), key=lambda h: h.last_used)
            if idle:
                # A quarter of the idle sessions per round (at least one): trimming copies the live rows,
                # so unloading one session at a time would repack the pool once per session.
                batch = idle[: max(1, len(idle) // 4)]
                unloaded = sum(await asyncio.gather(*(self.unload_checkpointed(hs) for hs in batch)))
                await self.on_engine(self.engine.trim)
                self.metrics.pool_bytes.set(self.engine.pool_bytes())
                need = over()
                if not need:
                    log.info("made room in the hot pool for %s: unloaded %d idle sessions", what, unloaded)
                    return
                if unloaded:
                    continue
                # None unloaded: the store refuses checkpoints, or they were taken meanwhile.
            busy = any(hs.lock.locked() and id(hs) not in own for hs in self._hot.values())
            now = time.monotonic()
            give_up_at = now + ROOM_WAIT_S if give_up_at is None else give_up_at
            if not busy or now >= give_up_at:
                break
            await asyncio.sleep(ROOM_POLL_S)
            need = over()
            if not need:
                return
        raise self.admission.pool_full(need, what)

    async def unload_checkpointed(self, hs: HotSession) -> bool:
        """Checkpoint then unload ``hs``, holding its lock throughout (no step slips in between)."""
        async with hs.lock:
            if (hs.tenant, hs.session_id) not in self._hot:
                return False
            if hs.dirty and not await self._write(hs):
                return False
            await self._unload(hs)
        self.metrics.sessions_unloaded.labels(hs.tenant).inc()
        return True

    async def _reap_idle(self) -> None:
        period = min(self.settings.maintenance_period_s, self.settings.idle_session_s / 2)
        while True:
            await asyncio.sleep(period)
            try:
                await self._reap_once()
            except Exception:  # a bug here must not stop reaping for the life of the process
                self.metrics.maintenance_errors.labels("reaper").inc()
                log.exception("idle reaper: unexpected error (counted in nexus_maintenance_errors_total); "
                              "it runs again in %.1f s", period)

    async def _reap_once(self) -> None:
        now = time.monotonic()
        for hs in list(self._hot.values()):
            idle = now - hs.last_used > self.settings.idle_session_s and not hs.lock.locked()
            if idle and await self.unload_checkpointed(hs):
                self.metrics.sessions_expired.labels(hs.tenant).inc()
        # Every period, not only after reaping: closes and class moves free rows too (trim only
        # repacks a pool when that at least halves it).
        await self.on_engine(self.engine.trim)
        self.metrics.pool_bytes.set(self.engine.pool_bytes())
