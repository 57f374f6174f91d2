"""Checkpoint scheduling: when a hot session's state goes to the store, and how.

The rows are copied on the engine thread under the session's lock (server/checkpoint_writer.py);
encoding (full, or a delta against the last full one) runs on the checkpoint thread and the write
on the event loop, while the session steps on. At most one checkpoint of a session is in flight
(``HotSession.writing``), so its writes reach the store in step order. The stepping path spawns a
cadence checkpoint every ``checkpoint_cadence`` steps; unloading and resync write one under the
session's lock; shutdown writes every dirty session.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nexus_sidecar.server import checkpoint_writer as writer
from nexus_sidecar.server.checkpoint_writer import Captured
from nexus_sidecar.server.session_table import HotSession
from nexus_sidecar.server.stores import StoreUnavailable

log = logging.getLogger("nexus_sidecar.sessions")
_REDO = object()  # _store: the delta did not fit, write a full checkpoint instead


class Checkpointing:
    """The checkpoint room of :class:`~nexus_sidecar.server.sessions.SessionManager`, whose state
    (engine, table, hot sessions, store, settings, metrics) and other rooms its methods use."""

    async def _cadence_checkpoint(self, hs: HotSession) -> None:
        written = False
        try:
            written = await self.checkpoint(hs)
        except Exception:  # a background task: nobody awaits it, so it is logged and counted here
            self.metrics.maintenance_errors.labels("checkpoint").inc()
            log.exception("cadence checkpoint of %s/%s: unexpected error (counted in "
                          "nexus_maintenance_errors_total)", hs.tenant, hs.session_id)
        finally:
            hs.checkpoint_queued = False
        # Steps committed while this one was in flight spawned none (it was queued): if they are due
        # now, the next one starts here rather than at the session's next step (which may never
        # come). Only after a success: a failing store is retried by the next step, not in a loop.
        every = self.settings.checkpoint_cadence
        if written and every and hs.table is not None and hs.step - hs.checkpointed_step >= every:
            hs.checkpoint_queued = True
            self._spawn(self._cadence_checkpoint(hs))

    async def checkpoint(self, hs: HotSession) -> bool:
        """Write the session's state to the store (CAS on its step). False if refused or failed.

        The rows are copied under the session's lock; encoding and the store write happen after it
        is released, so a background checkpoint never delays the session's next step.
        """
        async with hs.lock:
            if not hs.dirty or (hs.tenant, hs.session_id) not in self._hot:
                return True
            await hs.writing.acquire()  # lock order: hs.lock, then hs.writing (as in _write)
            try:
                cap = await self._capture(hs)
            except BaseException:
                hs.writing.release()
                raise
        try:
            written = await self._store(hs, cap)
        finally:
            hs.writing.release()
        if written is _REDO:  # the delta did not fit: a full one now (delta_base was cleared)
            return await self.checkpoint(hs)
        if written is None:  # fenced: drop the copy once no step of it is running
            async with hs.lock:
                await self._drop_fenced(hs)
        return bool(written)

    async def _write(self, hs: HotSession) -> bool:
        """Checkpoint with the caller holding ``hs.lock`` (unload and resync paths)."""
        async with hs.writing:
            written = await self._store(hs, await self._capture(hs))
            if written is _REDO:
                written = await self._store(hs, await self._capture(hs))
        if written is None:
            await self._drop_fenced(hs)
        return bool(written)

    async def _capture(self, hs: HotSession) -> Captured:
        """The consistent cut (caller holds ``hs.lock`` and ``hs.writing``): the rows copied on the
        engine thread, ordered with its calls; full or against the session's delta base."""
        base = hs.delta_base
        if base is not None and base.deltas + 1 >= self.settings.checkpoint_full_every:
            base = None
        rows, seconds = await self.on_engine(writer.capture, self.engine, hs.handle, base)
        last = b"" if hs.last_result is None else hs.last_result.session_result(hs.session_id).SerializeToString()
        return Captured(hs.step, hs.checksum, bytes(hs.digest), last, rows, base, seconds)

    async def _store(self, hs: HotSession, cap: Captured) -> bool | object | None:
        """Encode on the checkpoint thread, then write. True written, False refused (CAS) or store
        unreachable, None fenced, ``_REDO`` when a delta could not be encoded or the store's full
        checkpoint was not its base (``delta_base`` is cleared: retry with a full one)."""
        loop = asyncio.get_running_loop()
        enc = await loop.run_in_executor(self._ckpt_executor, writer.encode, cap)
        m, kind = self.metrics, cap.kind
        m.checkpoint_seconds.labels(kind, "capture").observe(cap.seconds)
        if enc is None:
            hs.delta_base = None
            return _REDO
        m.checkpoint_seconds.labels(kind, "encode").observe(enc.seconds)
        prior = hs.checkpointed_step if hs.stored else 0
        t0 = time.perf_counter()
        try:
            written = await self._put(hs, cap.step, enc.blob, base=None if cap.base is None else cap.base.step)
        except StoreUnavailable as exc:
            log.warning("checkpoint of %s/%s failed: %s (serving from hot state)", hs.tenant, hs.session_id, exc)
            return False
        m.checkpoint_seconds.labels(kind, "write").observe(time.perf_counter() - t0)
        if not written:
            if written is False and cap.base is not None:
                hs.delta_base = None
                return _REDO
            return written
        m.checkpoint_bytes.labels(hs.tenant, kind).inc(len(enc.blob))
        m.checkpoint_bytes_per_step.labels(hs.tenant).observe(len(enc.blob) / max(1, cap.step - prior))
        if cap.base is None:
            hs.delta_base = enc.base
        elif hs.delta_base is cap.base:
            cap.base.deltas += 1
            if len(enc.blob) * 2 > cap.base.nbytes:  # deltas grow with the appends: a full one is cheaper now
                hs.delta_base = None
        return True

    async def _put(self, hs: HotSession, step: int, blob: bytes, base: int | None = None) -> bool | None:
        """True written, False refused (CAS), None fenced; raises StoreUnavailable."""
        written = await self.ownership.put(hs, step, blob, base=base)
        if written is None:
            return None
        if written:
            hs.checkpointed_step = max(hs.checkpointed_step, step)
            hs.stored = True
        elif base is None:  # a refused delta is retried as a full checkpoint at once (see _store)
            log.warning("checkpoint of %s/%s at step %d refused: the store holds a newer step (another replica "
                        "owns this session)", hs.tenant, hs.session_id, step)
        return written

    async def checkpoint_all(self) -> int:
        """Checkpoint every dirty hot session; returns how many were written."""
        results = await asyncio.gather(*(self.checkpoint(hs) for hs in list(self._hot.values()) if hs.dirty))
        return sum(bool(r) for r in results)
