"""The session layer: hot sessions on the engine's device, durable checkpoints in the store.

Its rooms: the hot sessions' step state in columns (server/session_table.py), the stepping path
(server/stepping.py), checkpoint scheduling (server/checkpointing.py), unloading, fencing and
reaping (server/unloading.py); this module holds the session lifecycle (open, resume, close,
resync), the engine thread, and inspection, and puts the rooms together in :class:`SessionManager`.

All engine access runs on one dedicated thread (the engine is not thread-safe and must not
block the event loop), through :meth:`SessionManager.on_engine`. The event loop reads the engine
directly only where ``Engine``'s docstring allows it: the published pool sizes (admission,
``make_room``, the reaper's gauge) and per-session reads of sessions whose lock it holds.
``_hot``, ``_loading``, the session table and the ``HotSession`` fields are the event loop's
alone. Each session has a lock (its in-flight flag in the table), so at most one of its steps is
in flight: per-session order holds, and a batch never carries two steps of one session.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import tensor_to_proto

from nexus_sidecar.engine import Engine, PolicyConfig
from nexus_sidecar.server import codec
from nexus_sidecar.server.admission import Admission
from nexus_sidecar.server.answers import Answer
from nexus_sidecar.server.batcher import MicroBatcher
from nexus_sidecar.server.checkpoint import load
from nexus_sidecar.server.checkpointing import Checkpointing
from nexus_sidecar.server.errors import (
    InvalidArgument,
    SessionConflict,
    SessionFenced,
    SessionNotFound,
)
from nexus_sidecar.server.metrics import Metrics
from nexus_sidecar.server.ownership import Ownership
from nexus_sidecar.server.resync import Reseeded, reseed, retained_positions
from nexus_sidecar.server.retention_history import RetentionHistory
from nexus_sidecar.server.session_table import HotSession, SessionTable
from nexus_sidecar.server.settings import ServerSettings
from nexus_sidecar.server.step_columns import StepDigest
from nexus_sidecar.server.stepping import StepPath
from nexus_sidecar.server.stores import StateStore, validate_id
from nexus_sidecar.server.unloading import Unloading

log = logging.getLogger("nexus_sidecar.sessions")
T = TypeVar("T")


def os_thread_name(name: str) -> None:
    """Name the calling thread for the OS too (``top -H``, ``/proc/<pid>/task/*/comm``, the service
    benchmark's CPU by thread); Python < 3.12 leaves every thread named after the process."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: the name is only cosmetic
        pass


@dataclass
class _Series:
    """Metric children of one (tenant, policy)."""

    seen: Any
    evicted: Any
    retained: Any
    ratio: Any
    mass: Any
    age: Any


class SessionManager(StepPath, Checkpointing, Unloading):
    """Opens, steps, checkpoints, resumes and closes sessions for every tenant: the lifecycle here,
    the rooms' methods from :class:`StepPath`, :class:`Checkpointing` and :class:`Unloading`."""

    def __init__(self, engine: Engine, store: StateStore, settings: ServerSettings, metrics: Metrics) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(settings, engine)
        self.ownership = Ownership(store, metrics, fence_timeout_s=settings.fence_timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-engine",
                                            initializer=os_thread_name, initargs=("nexus-engine",))
        # Encoding checkpoints: off the engine thread (numpy releases the GIL on the bulk copies).
        self._ckpt_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-checkpoint",
                                                 initializer=os_thread_name, initargs=("nexus-ckpt",))
        self.table = SessionTable()  # the hot sessions' step state in columns (server/session_table.py)
        self._hot: dict[tuple[str, str], HotSession] = {}
        self._loading: dict[tuple[str, str], asyncio.Future[HotSession]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._series_cache: dict[tuple[str, str], _Series] = {}
        self.batcher = MicroBatcher(self._run_batch, metrics, max_batch=settings.max_batch,
                                    max_delay_us=settings.max_delay_us, queue_size=settings.queue_size)
        # What the retention page (/ui/sessions/{id}) draws; its weight reads run on the engine thread.
        self.history = RetentionHistory(engine, self._executor.submit, sessions=settings.ui_history_sessions,
                                        calls=settings.ui_history_calls)

    # -- plumbing -----------------------------------------------------------------------------
    async def on_engine(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the engine thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def start(self) -> None:
        """Start the batcher and the idle-session reaper."""
        self.batcher.start()
        self._spawn(self._reap_idle())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def shutdown(self) -> None:
        """Finish in-flight steps, checkpoint every dirty session, release the engine thread."""
        await self.batcher.close()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.checkpoint_all()
        self._executor.shutdown(wait=True)
        self._ckpt_executor.shutdown(wait=True)

    def hot_sessions(self, tenant: str | None = None) -> list[HotSession]:
        """Hot sessions (of one tenant, or all)."""
        return [hs for (t, _), hs in self._hot.items() if tenant is None or t == tenant]

    # -- lifecycle ----------------------------------------------------------------------------
    async def open(self, tenant: str, session_id: str, cfg: PolicyConfig) -> HotSession:
        """Open a session; opening an existing id with the same config returns it (idempotent)."""
        validate_id("session_id", session_id)
        self.admission.check_config(cfg)
        try:
            hs = await self.get(tenant, session_id)
        except SessionNotFound:
            hs = None
        if hs is not None:
            if hs.cfg != cfg:
                raise SessionConflict(f"session {session_id!r} already exists with a different config "
                                      f"({hs.cfg.to_json()}); close it first or use another id")
            return hs
        self.admission.check_tenant_sessions(tenant, len(self.hot_sessions(tenant)))
        await self.make_room(lambda: self.admission.open_fits(cfg), f"opening a session of {cfg.groups} groups")
        epoch, _ = await self.ownership.claim(tenant, session_id)
        handle = await self.on_engine(self.engine.open, cfg)
        hs = HotSession(self.table, tenant, session_id, handle, cfg, epoch=epoch)
        self._hot[(tenant, session_id)] = hs
        self.metrics.sessions_opened.labels(tenant).inc()
        self.metrics.sessions_open.labels(tenant).set(len(self.hot_sessions(tenant)))
        return hs

    async def get(self, tenant: str, session_id: str) -> HotSession:
        """The hot session, resuming it from the store when another process checkpointed it."""
        validate_id("session_id", session_id)
        key = (tenant, session_id)
        hs = self._hot.get(key)
        if hs is not None:
            hs.last_used = time.monotonic()
            return hs
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[HotSession] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            hs = await self._resume(tenant, session_id)
            fut.set_result(hs)
            return hs
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: concurrent waiters re-raise it themselves
            raise
        finally:
            del self._loading[key]

    async def _resume(self, tenant: str, session_id: str) -> HotSession:
        # A plain read first: an unknown id must not leave an epoch behind in the store.
        if await self.store.get(tenant, session_id) is None:
            raise SessionNotFound(session_id)
        epoch, stored = await self.ownership.claim(tenant, session_id)  # ours from now on
        if stored is None:
            raise SessionNotFound(session_id)
        loaded = load(stored.blob, stored.delta, stored.step)
        cp = loaded.checkpoint
        if loaded.fallback is not None:
            # Older state, never wrong state: the worker's next step is refused with the expected
            # step (FAILED_PRECONDITION) and it resyncs the steps in between.
            self.metrics.checkpoint_fallbacks.labels(tenant).inc()
            log.warning("session %s/%s: the delta checkpoint at step %d is unusable (%s); resuming from the full "
                        "checkpoint at step %d", tenant, session_id, stored.step, loaded.fallback, cp.step)
        cfg = cp.state.config
        await self.make_room(lambda: self.admission.open_fits(cfg), f"resuming a session of {cfg.groups} groups")
        handle = await self.on_engine(self.engine.restore, cp.state)
        last = Answer.from_session_result(pb.SessionResult.FromString(cp.last_result)) if cp.last_result else None
        hs = HotSession(self.table, tenant, session_id, handle, cp.state.config, step=cp.step, checksum=cp.checksum,
                        count=sum(g.pos.numel() for g in cp.state.groups),
                        widest=max((g.pos.numel() for g in cp.state.groups), default=0), digest=StepDigest(cp.digest),
                        last_result=last, checkpointed_step=cp.step, stored=True, epoch=epoch)
        self._hot[(tenant, session_id)] = hs
        self._series(hs).retained.inc(hs.count)  # _unload decrements it
        self.metrics.sessions_resumed.labels(tenant).inc()
        self.metrics.sessions_open.labels(tenant).set(len(self.hot_sessions(tenant)))
        log.info("resumed session %s/%s at step %d from the store", tenant, session_id, cp.step)
        return hs

    async def close(self, tenant: str, session_id: str) -> int:
        """Drop a session's hot and durable state; returns its last step."""
        async with self.locked(tenant, session_id) as hs:
            # Durable first: the tombstone is written (or UNAVAILABLE is raised and the session
            # stays as it was), and only then is the hot copy released.
            await self.ownership.close(tenant, session_id)
            await self._unload(hs)
        self.history.forget(tenant, session_id)
        self.metrics.sessions_closed.labels(tenant).inc()
        return hs.step

    @contextlib.asynccontextmanager
    async def locked(self, tenant: str, session_id: str) -> AsyncIterator[HotSession]:
        """The hot session with its lock held, still hot once the lock is ours.

        A session can be unloaded (idle reaper, LRU room-making) while a request waits for its
        lock; such a request resumes it again instead of using a closed engine handle.
        """
        while True:
            hs = await self.get(tenant, session_id)
            await hs.lock.acquire()
            if self._hot.get((tenant, session_id)) is hs:
                break
            hs.lock.release()
        try:
            yield hs
        finally:
            hs.lock.release()

    async def resync(self, tenant: str, session_id: str, given: PolicyConfig | None, step: int,
                     retained: list[pb.Tensor]) -> tuple[HotSession, Reseeded, int]:
        """Re-seed a session from the worker's retained positions and step (see server/resync.py).

        Returns the hot session, what was known/admitted, and the step the sidecar was at before.
        A session the sidecar knows nothing about needs ``given`` (its config).
        """
        validate_id("session_id", session_id)
        try:
            async with self.locked(tenant, session_id) as hs:
                prior = await self.on_engine(self.engine.snapshot, hs.handle)
                before = hs.step
                positions = retained_positions(retained, hs.cfg)
                seeded = reseed(hs.cfg, prior, positions, step)
                handle = await self.on_engine(self.engine.restore, seeded.state)
                old, hs.handle = hs.handle, handle
                await self.on_engine(self.engine.close, old)
                hs.epoch, _ = await self.ownership.claim(tenant, session_id)  # the worker's truth takes over
                self._reset_to(hs, step, positions)
                await self._write(hs)
        except SessionNotFound:
            if given is None:
                raise InvalidArgument("config", "the sidecar has no state for this session: send its config") \
                    from None
            self.admission.check_config(given)
            self.admission.check_tenant_sessions(tenant, len(self.hot_sessions(tenant)))
            positions = retained_positions(retained, given)
            seeded = reseed(given, None, positions, step)
            await self.make_room(lambda: self.admission.open_fits(given), "resyncing a session")
            epoch, _ = await self.ownership.claim(tenant, session_id)
            handle = await self.on_engine(self.engine.restore, seeded.state)
            hs = HotSession(self.table, tenant, session_id, handle, given, epoch=epoch)
            self._hot[(tenant, session_id)] = hs
            self._reset_to(hs, step, positions)
            async with hs.lock:
                await self._write(hs)
            self.metrics.sessions_open.labels(tenant).set(len(self.hot_sessions(tenant)))
            before = 0
        self.metrics.sessions_resynced.labels(tenant).inc()
        log.warning("resynced session %s/%s from the worker at step %d (sidecar was at step %d): %d positions known, "
                    "%d admitted as newcomers", tenant, session_id, step, before, seeded.known, seeded.admitted)
        return hs, seeded, before

    def _reset_to(self, hs: HotSession, step: int, positions: list[torch.Tensor]) -> None:
        """The session's bookkeeping after a resync: the worker's step, count and checksum."""
        count = sum(p.numel() for p in positions)
        self._series(hs).retained.inc(count - hs.count)
        hs.step, hs.count, hs.checksum = step, count, codec.checksum_of(positions)
        hs.widest = max(self.engine.counts(hs.handle), default=0)  # the restored rows (host mirror)
        hs.digest, hs.last_result = StepDigest(), None  # nothing to answer a retry of an older step with
        hs.checkpointed_step, hs.stored = 0, False
        hs.delta_base = None  # a new history: the next checkpoint is a full one
        hs.last_used = time.monotonic()

    # -- metrics ------------------------------------------------------------------------------
    def _series(self, hs: HotSession) -> _Series:
        """The session's labelled metric children (looked up once per tenant and policy)."""
        key = (hs.tenant, hs.cfg.policy)
        series = self._series_cache.get(key)
        if series is None:
            m = self.metrics
            series = self._series_cache[key] = _Series(
                seen=m.tokens_seen.labels(*key), evicted=m.tokens_evicted.labels(*key),
                retained=m.tokens_retained.labels(*key), ratio=m.retention_ratio.labels(*key),
                mass=m.retained_mass.labels(*key), age=m.eviction_age.labels(*key))
        return series

    # -- inspection ---------------------------------------------------------------------------
    async def describe(self, tenant: str, session_id: str, include_weights: bool = False) -> pb.GetSessionResponse:
        """Retention snapshot of one session."""
        async with self.locked(tenant, session_id) as hs:
            if await self.ownership.stale(tenant, [hs]):
                await self._drop_fenced(hs)
                raise SessionFenced(session_id)
            positions = await self.on_engine(self.engine.positions, hs.handle)
            weights = await self.on_engine(self.engine.memory, hs.handle)
            seen, evicted = self.engine.stats(hs.handle)
        groups = []
        for g, (p, w) in enumerate(zip(positions, weights, strict=True)):
            gr = pb.GroupRetention(group=g, positions=tensor_to_proto(p.to(torch.int64)),
                                   weight_summary=codec.weight_summary(w))
            if include_weights:
                gr.weights.CopyFrom(tensor_to_proto(w.to(torch.float32)))
            groups.append(gr)
        return pb.GetSessionResponse(
            session_id=session_id, config=codec.config_to_proto(hs.cfg), step=hs.step, groups=groups,
            tokens_seen=seen, tokens_evicted=evicted, retained_count=hs.count,
            retained_checksum=codec.checksum_of(positions),
        )

    async def list_ids(self, tenant: str) -> list[str]:
        """Hot and stored session ids of a tenant (sorted)."""
        stored = await self.store.list(tenant)
        return sorted(set(stored) | {hs.session_id for hs in self.hot_sessions(tenant)})
