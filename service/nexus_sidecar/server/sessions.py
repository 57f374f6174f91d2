"""The session layer: hot sessions on the engine's device, durable checkpoints in the store.

All engine access runs on one dedicated thread (the engine is not thread-safe and must not
block the event loop), through :meth:`SessionManager.on_engine`. The event loop reads the engine
directly only where ``Engine``'s docstring allows it: the published pool sizes (admission,
``make_room``, the reaper's gauge) and per-session reads of sessions whose lock it holds.
``_hot``, ``_loading`` and the ``HotSession`` fields are the event loop's alone. Each session has
a lock, so at most one of its steps is in flight: per-session order holds, and a batch never
carries two steps of one session.

Checkpoints (server/checkpoint_writer.py): the engine thread only copies the session's rows,
under its lock; encoding (full, or a delta against the last full one) runs on a checkpoint thread
and the write on the event loop, while the session steps on. At most one checkpoint of a session
is in flight (``HotSession.writing``), so its writes reach the store in step order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import tensor_to_proto

from nexus_sidecar.engine import Engine, EngineError, PolicyConfig, StepInput, StepOutput
from nexus_sidecar.engine.errors import FieldError
from nexus_sidecar.server import checkpoint_writer as writer
from nexus_sidecar.server import codec, step_columns
from nexus_sidecar.server.admission import Admission
from nexus_sidecar.server.answers import Answer, HostOutput, answer_batch, encode_batch
from nexus_sidecar.server.batcher import Job, MicroBatcher
from nexus_sidecar.server.checkpoint import load
from nexus_sidecar.server.checkpoint_writer import Captured
from nexus_sidecar.server.errors import (
    InvalidArgument,
    SessionConflict,
    SessionFenced,
    SessionNotFound,
    StateMismatch,
    StepOutOfOrder,
    step_field,
)
from nexus_sidecar.server.metrics import Metrics, observe_many
from nexus_sidecar.server.ownership import Ownership
from nexus_sidecar.server.resync import Reseeded, reseed, retained_positions
from nexus_sidecar.server.retention_history import RetentionHistory
from nexus_sidecar.server.session_table import HotSession, SessionTable
from nexus_sidecar.server.settings import ServerSettings
from nexus_sidecar.server.step_columns import LazyInput, StepColumns, StepDigest
from nexus_sidecar.server.stores import StateStore, StoreUnavailable, validate_id

log = logging.getLogger("nexus_sidecar.sessions")
T = TypeVar("T")
_REDO = object()  # _store: the delta did not fit, write a full checkpoint instead


@dataclass
class _Series:
    """Metric children of one (tenant, policy)."""

    seen: Any
    evicted: Any
    retained: Any
    ratio: Any
    mass: Any
    age: Any


class SessionManager:
    """Opens, steps, checkpoints, resumes and closes sessions for every tenant."""

    def __init__(self, engine: Engine, store: StateStore, settings: ServerSettings, metrics: Metrics) -> None:
        self.engine = engine
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(settings, engine)
        self.ownership = Ownership(store, metrics, fence_timeout_s=settings.fence_timeout_s)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-engine")
        # Encoding checkpoints: off the engine thread (numpy releases the GIL on the bulk copies).
        self._ckpt_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-checkpoint")
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

    async def _run_batch(self, items: dict[int, StepInput | LazyInput]) -> dict[int, HostOutput | EngineError]:
        def run() -> tuple[dict[int, HostOutput | EngineError], float, float]:
            # Inputs become tensors and outputs become numpy views here, on the engine thread: torch
            # calls on the event loop would queue for the GIL behind this thread's ops.
            inputs = {h: x.build() if isinstance(x, LazyInput) else x for h, x in items.items()}
            t0, c0 = time.perf_counter(), time.thread_time()
            outs = self.engine.step(inputs, raise_errors=False)
            seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
            return {h: (HostOutput.of(o) if isinstance(o, StepOutput) else o) for h, o in outs.items()}, seconds, cpu

        outs, seconds, cpu = await self.on_engine(run)
        self.metrics.compute_seconds.labels(self.engine.device.type).observe(seconds)
        self.metrics.compute_cpu_seconds.labels(self.engine.device.type).inc(cpu)
        return outs

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

    # -- stepping -----------------------------------------------------------------------------
    async def step_many(self, tenant: str, steps: list[pb.SessionStep], deadline: float | None
                        ) -> list[pb.SessionResult]:
        """The per-session form (``Step``): converted to columns, then the one path of :meth:`step_columns`."""
        self.admission.check_rpc(len(steps))  # before any per-message work
        cols = step_columns.from_steps(steps)
        answers = await self.step_columns(tenant, cols, deadline)
        return [a.session_result(sid) for a, sid in zip(answers, cols.ids, strict=True)]

    async def step_batch(self, tenant: str, request: pb.StepBatchRequest, deadline: float | None
                         ) -> pb.StepBatchResponse:
        """The columnar form (``StepBatch``): read with a few array calls, answered columnar."""
        self.admission.check_rpc(len(request.session_ids))
        cols = step_columns.from_batch(request)
        return encode_batch(await self.step_columns(tenant, cols, deadline))

    async def step_columns(self, tenant: str, cols: StepColumns, deadline: float | None) -> list[Answer]:
        """Apply one step to each session of ``cols``. Every step is validated before any is applied.

        Retries of a session's last step are answered from its cached answer; the others go to the
        engine as one job of the micro-batcher.
        """
        ids = cols.ids
        if len(set(ids)) != len(ids):
            dupes = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
            raise InvalidArgument("steps", f"session {dupes[0]!r} appears more than once in one request")
        # Shielded: once a step may reach the engine it is committed even if the caller goes away
        # (RPC deadline or cancel). Otherwise the engine state advances without the session's
        # step/count/checksum, and every retry of that step is rejected.
        work = asyncio.ensure_future(self._apply(tenant, cols, deadline))
        work.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(work)

    async def _apply(self, tenant: str, cols: StepColumns, deadline: float | None) -> list[Answer]:
        ids = cols.ids
        first_error: BaseException | None = None
        sessions, slots = await self._lock_all(tenant, ids)
        try:
            stale = await self.ownership.stale(tenant, sessions)
            if stale:  # another replica took these over: never answer for them
                for hs in stale:
                    await self._drop_fenced(hs)  # type: ignore[arg-type]
                raise SessionFenced(stale[0].session_id)
            answers: list[Answer | None] = [None] * len(ids)
            ints = cols.int_fields()
            fresh = self._plan(sessions, slots, cols, ints, answers)
            if fresh.size:
                first_error = await self._run_fresh(tenant, sessions, slots, cols, ints, fresh, answers, deadline)
        finally:
            self._unlock_all(sessions, slots)
        if first_error is not None:
            raise first_error
        return answers  # type: ignore[return-value]  # every entry is set once no error was raised

    async def _lock_all(self, tenant: str, ids: list[str]) -> tuple[list[HotSession], np.ndarray]:
        """Every session of ``ids`` hot with its lock held, in request order, and their table slots.

        The steady state (every session hot, none locked or awaited) takes all the locks with one
        array operation. Otherwise they are taken one at a time in id order (no lock-order
        deadlock), as :meth:`locked` does for one. On an error none is held."""
        hot = self._hot
        found = [hot.get((tenant, sid)) for sid in ids]
        if None not in found:
            sessions: list[HotSession] = found  # type: ignore[assignment]
            slots = np.fromiter((hs.slot for hs in sessions), dtype=np.int64, count=len(sessions))
            if self.table.try_lock(slots):
                self.table.col["last_used"][slots] = time.monotonic()
                return sessions, slots
        held: dict[str, HotSession] = {}
        try:
            for sid in sorted(ids):
                while True:
                    hs = await self.get(tenant, sid)
                    await hs.lock.acquire()
                    if self._hot.get((tenant, sid)) is hs:
                        break
                    hs.lock.release()  # unloaded while we waited: resume it again
                held[sid] = hs
        except BaseException:
            for hs in held.values():
                hs.lock.release()
            raise
        sessions = [held[sid] for sid in ids]
        return sessions, np.fromiter((hs.slot for hs in sessions), dtype=np.int64, count=len(sessions))

    def _unlock_all(self, sessions: list[HotSession], slots: np.ndarray) -> None:
        """Release what :meth:`_lock_all` took: one array operation while every session is still in the
        table (one that left it, e.g. fenced, has its lock to itself now)."""
        table = self.table
        if all(hs.table is table for hs in sessions):
            table.col["in_flight"][slots] = False
            if table.waiting:
                for hs in sessions:
                    if hs.slot in table.waiting:
                        hs.lock.wake()
        else:
            for hs in sessions:
                hs.lock.release()

    def _plan(self, sessions: list[HotSession], slots: np.ndarray, cols: StepColumns, ints: dict[str, np.ndarray],
              answers: list[Answer | None]) -> np.ndarray:
        """Check order and worker state for the whole batch (from the table's columns); fill in the
        cached answers of retries and return the indices of the steps that go to the engine."""
        col = self.table.col
        current = col["step"][slots]
        cached = np.not_equal(self.table.obj["last_result"][slots], None)
        retry = (cols.steps == current) & (current > 0) & cached
        for b in np.flatnonzero(retry).tolist():
            hs = sessions[b]
            if cols.digest(b, ints) != bytes(hs.digest):
                raise StepOutOfOrder(hs.session_id, int(cols.steps[b]), hs.step + 1,
                                     note="it was already applied with a different payload")
            answers[b] = hs.last_result
        out_of_order = np.flatnonzero(~retry & (cols.steps != current + np.uint64(1)))
        if out_of_order.size:
            b = int(out_of_order[0])
            raise StepOutOfOrder(sessions[b].session_id, int(cols.steps[b]), sessions[b].step + 1)
        fresh = np.flatnonzero(~retry)
        if not fresh.size:
            return fresh
        self.admission.check_new_tokens(cols.ids, cols.k, fresh)  # before the payload is decoded
        fs = slots[fresh]
        diverged = np.flatnonzero((cols.retained_counts[fresh] != col["count"][fs])
                                  | (cols.retained_checksums[fresh] != col["checksum"][fs]))
        if diverged.size:
            b = int(fresh[diverged[0]])
            hs = sessions[b]
            raise StateMismatch(
                f"session {hs.session_id!r} before step {int(cols.steps[b])}: worker holds "
                f"{int(cols.retained_counts[b])} tokens (checksum {int(cols.retained_checksums[b]):#018x}), sidecar "
                f"holds {hs.count} (checksum {hs.checksum:#018x}) at step {hs.step}; the worker's cache and the "
                "sidecar's state diverged (failover to an older checkpoint?). Reopen the session or rebuild the "
                "worker's cache.")
        return fresh

    async def _run_fresh(self, tenant: str, sessions: list[HotSession], slots: np.ndarray, cols: StepColumns,
                         ints: dict[str, np.ndarray], fresh: np.ndarray, answers: list[Answer | None],
                         deadline: float | None) -> BaseException | None:
        """Validate, run and commit the steps ``fresh``; returns the first engine refusal (request order)."""
        col = self.table.col
        fs = slots[fresh]
        rows = fresh.tolist()
        hot = [sessions[b] for b in rows]
        groups = col["groups"][fs]
        cols.check_layout(rows, groups, col["fanout"][fs], col["widest"][fs], [hs.cfg.policy for hs in hot])
        cols.check_positions(rows, ints)
        digests = [cols.deferred_digest(b, ints) for b in rows]
        inputs = cols.inputs(rows, groups.tolist(), ints)
        handles = col["handle"][fs].tolist()
        k = cols.k[fresh]
        ks = dict(zip(handles, k.tolist(), strict=True))
        # Widening the arena is the allocation a step can cause: admitted first.
        await self.make_room(lambda: self.admission.step_fits(ks), f"a step of {int(k.max())} new tokens")
        job = Job(dict(zip(handles, inputs, strict=True)), tenant, deadline)
        try:
            outs = await self.batcher.submit(job)
        except BaseException as exc:  # queue full, deadline, draining: nothing was applied
            return exc
        good = [j for j, h in enumerate(handles) if isinstance(outs[h], HostOutput)]
        first_error = next((_named(outs[handles[j]], hot[j].session_id)  # type: ignore[arg-type]
                            for j in range(len(hot)) if j not in set(good)), None)
        if good:
            tok = cols.columns["new_positions"].offsets
            done = self._commit([hot[j] for j in good], fs[good], cols.steps[fresh[good]],
                                [outs[handles[j]] for j in good],  # type: ignore[misc]
                                k[good], np.concatenate([ints["new_positions"][tok[b]: tok[b + 1]]
                                                         for b in fresh[good].tolist()]),
                                [digests[j] for j in good])
            for j, ans in zip(good, done, strict=True):
                answers[rows[j]] = ans
        return first_error

    def _commit(self, hot: list[HotSession], slots: np.ndarray, steps: np.ndarray, outs: list[HostOutput],
                ks: np.ndarray, new_pos: np.ndarray, digests: list[StepDigest]) -> list[Answer]:
        """Commit engine outputs into the table: answers, checksums and metrics computed for the whole
        batch (numpy only: see LazyInputs for why no torch call runs here). Returns the answers."""
        col, obj = self.table.col, self.table.obj
        answers = answer_batch(steps.tolist(), outs, new_pos, np.concatenate([[0], np.cumsum(ks)]),
                               col["checksum"][slots].tolist())
        before = col["count"][slots].copy()
        now = np.array([a.count for a in answers], dtype=np.int64)
        self.history.record_many([(hs.tenant, hs.session_id, hs.handle, ans.step, k, out)
                                  for hs, ans, k, out in zip(hot, answers, ks.tolist(), outs, strict=True)])
        col["step"][slots] = steps
        col["count"][slots] = now
        col["checksum"][slots] = np.array([a.checksum for a in answers], dtype=np.uint64)
        col["widest"][slots] = [max(o.retained) for o in outs]
        obj["digest"][slots] = _objects(digests)
        obj["last_result"][slots] = _objects(answers)
        every = self.settings.checkpoint_cadence
        if every:
            due = np.flatnonzero((steps.astype(np.int64) - col["checkpointed_step"][slots].astype(np.int64) >= every)
                                 & ~col["checkpoint_queued"][slots])
            if due.size:
                col["checkpoint_queued"][slots[due]] = True
                for j in due.tolist():
                    self._spawn(self._cadence_checkpoint(hot[j]))
        # Metrics per (tenant, policy) series: one RPC is one tenant, and mostly one policy.
        by_policy: dict[str, list[int]] = {}
        for j, hs in enumerate(hot):
            by_policy.setdefault(hs.cfg.policy, []).append(j)
        G = col["groups"][slots]
        for js_l in by_policy.values():
            m = self._series(hot[js_l[0]])
            js = np.asarray(js_l)
            g, k, was, after = G[js], ks[js].astype(np.int64), before[js], now[js]
            m.seen.inc(int(k.sum()))
            evicted = int((was + g * k - after).sum())
            m.evicted.inc(evicted)
            m.retained.inc(int((after - was).sum()))
            observe_many(m.ratio, after / np.maximum(1, was + g * k))
            observe_many(m.mass, np.concatenate([outs[j].retained_mass for j in js_l]))
            if evicted:
                ages = np.concatenate([outs[j].evicted_age.reshape(-1) for j in js_l])
                observe_many(m.age, ages[ages > 0])
        return answers

    async def _cadence_checkpoint(self, hs: HotSession) -> None:
        try:
            await self.checkpoint(hs)
        except Exception:  # a background task: nobody awaits it, so it is logged and counted here
            self.metrics.maintenance_errors.labels("checkpoint").inc()
            log.exception("cadence checkpoint of %s/%s: unexpected error (counted in "
                          "nexus_maintenance_errors_total)", hs.tenant, hs.session_id)
        finally:
            hs.checkpoint_queued = False

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

    # -- durability ---------------------------------------------------------------------------
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

    async def _drop_fenced(self, hs: HotSession) -> None:
        """Release a hot copy another replica owns now (no checkpoint: it would be refused)."""
        if self._hot.get((hs.tenant, hs.session_id)) is hs:
            await self._unload(hs)
            self.metrics.sessions_fenced.labels(hs.tenant).inc()
            log.warning("dropped session %s/%s at step %d: another replica owns it now (newer epoch)", hs.tenant,
                        hs.session_id, hs.step)

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

    async def make_room(self, over: Callable[[], int], what: str) -> None:
        """Unload idle sessions (checkpointed, least recently used first) until ``over()`` is 0.

        ``over()`` says how many bytes the pending allocation would take the pool over its budget.
        Sessions whose lock is held (stepping now, or part of the caller's RPC) are never picked.
        Raises the pool budget's RESOURCE_EXHAUSTED when nothing idle is left to unload.
        """
        need = over()
        if not need:
            return
        while True:
            idle = sorted((hs for hs in self._hot.values() if not hs.lock.locked()), key=lambda h: h.last_used)
            if not idle:
                break
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
            if not unloaded:
                break  # the store refuses checkpoints: nothing can be unloaded safely
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

    async def checkpoint_all(self) -> int:
        """Checkpoint every dirty hot session; returns how many were written."""
        results = await asyncio.gather(*(self.checkpoint(hs) for hs in list(self._hot.values()) if hs.dirty))
        return sum(bool(r) for r in results)

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


def _objects(items: list[Any]) -> np.ndarray:
    """A 1-D object array of ``items`` (for the table's object columns)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _named(exc: BaseException, session_id: str) -> BaseException:
    """An engine field error (found on the device) as INVALID_ARGUMENT on ``steps[<id>].<proto field>``."""
    if isinstance(exc, FieldError) and not exc.field.startswith("steps["):
        return InvalidArgument(step_field(session_id, exc.field), exc.reason)
    return exc
