"""The stepping path: a Step or StepBatch RPC from its columns to its answers.

Every step of an RPC is validated before any is applied. The sessions' step state is read and
written in the session table's columns (server/session_table.py): the batch is locked, checked
(order, retries, the worker's count and checksum, shapes) and committed with array operations;
the engine call runs on the engine thread as one job of the micro-batcher. Retries of a session's
last step are answered from its cached answer.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import numpy as np
import torch
from nexus_client.v1 import sidecar_pb2 as pb

from nexus_sidecar.engine import BatchInput, EngineError, StepInput, StepOutput
from nexus_sidecar.engine.errors import FieldError
from nexus_sidecar.server import step_columns
from nexus_sidecar.server.answers import Answer, HostBatch, HostOutput, answer_batch, encode_batch
from nexus_sidecar.server.batcher import Job
from nexus_sidecar.server.errors import InvalidArgument, SessionFenced, StateMismatch, StepOutOfOrder, step_field
from nexus_sidecar.server.metrics import observe_many
from nexus_sidecar.server.session_table import HotSession
from nexus_sidecar.server.step_columns import LazyInput, LazyInputs, StepColumns, StepDigest


class StepPath:
    """The stepping room of :class:`~nexus_sidecar.server.sessions.SessionManager`, whose state
    (engine, table, hot sessions, store, settings, metrics) and other rooms its methods use."""

    async def _run_batch(self, items: dict[int, StepInput | LazyInput]
                         ) -> dict[int, HostOutput | tuple[HostBatch, int] | EngineError]:
        def run() -> tuple[dict[int, HostOutput | tuple[HostBatch, int] | EngineError], float, float]:
            # Inputs become tensors and outputs become numpy views here, on the engine thread: torch
            # calls on the event loop would queue for the GIL behind this thread's ops.
            batch = _columnar(items)
            t0, c0 = time.perf_counter(), time.thread_time()
            if batch is not None:  # the columnar entry: no per-session object in or out
                handles = list(items)
                res = self.engine.step_batch(handles, batch)
                seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
                host = HostBatch.of(res)
                return {h: res.errors.get(b, (host, b)) for b, h in enumerate(handles)}, seconds, cpu
            inputs = {h: x.build() if isinstance(x, LazyInput) else x for h, x in items.items()}
            outs = self.engine.step(inputs, raise_errors=False)
            seconds, cpu = time.perf_counter() - t0, time.thread_time() - c0
            return {h: (HostOutput.of(o) if isinstance(o, StepOutput) else o) for h, o in outs.items()}, seconds, cpu

        outs, seconds, cpu = await self.on_engine(run)
        self.metrics.compute_seconds.labels(self.engine.device.type).observe(seconds)
        self.metrics.compute_cpu_seconds.labels(self.engine.device.type).inc(cpu)
        return outs

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
        await self.make_room(lambda: self.admission.step_fits(ks), f"a step of {int(k.max())} new tokens",
                             mine=sessions)
        job = Job(dict(zip(handles, inputs, strict=True)), tenant, deadline)
        try:
            outs = await self.batcher.submit(job)
        except BaseException as exc:  # queue full, deadline, draining: nothing was applied
            return exc
        good = [j for j, h in enumerate(handles) if not isinstance(outs[h], BaseException)]
        first_error = next((_named(outs[handles[j]], hot[j].session_id)  # type: ignore[arg-type]
                            for j in range(len(hot)) if isinstance(outs[handles[j]], BaseException)), None)
        if good:
            tok = cols.columns["new_positions"].offsets
            every = len(good) == len(cols)  # every step of the RPC is fresh and went through
            new_pos = ints["new_positions"] if every else \
                np.concatenate([ints["new_positions"][tok[b]: tok[b + 1]] for b in fresh[good].tolist()])
            done = self._commit([hot[j] for j in good], fs[good], cols.steps[fresh[good]],
                                HostBatch.gather([outs[handles[j]] for j in good]),  # type: ignore[misc]
                                k[good], new_pos, [digests[j] for j in good])
            for j, ans in zip(good, done, strict=True):
                answers[rows[j]] = ans
        return first_error

    def _commit(self, hot: list[HotSession], slots: np.ndarray, steps: np.ndarray, out: HostBatch,
                ks: np.ndarray, new_pos: np.ndarray, digests: list[StepDigest]) -> list[Answer]:
        """Commit engine outputs into the table: answers, checksums and metrics computed for the whole
        batch (numpy only: see LazyInputs for why no torch call runs here). Returns the answers."""
        col, obj = self.table.col, self.table.obj
        answers = answer_batch(steps, out, new_pos, np.concatenate([[0], np.cumsum(ks)]), col["checksum"][slots])
        batch = answers[0].source[0]  # type: ignore[index]  # every fresh answer has its batch
        before = col["count"][slots].copy()
        now = batch.counts
        row_off = out.row_offsets
        self.history.record_many(hot[0].tenant, [hs.session_id for hs in hot], col["handle"][slots].tolist(),
                                 steps.tolist(), ks.tolist(), out.output)
        col["step"][slots] = steps
        col["count"][slots] = now
        col["checksum"][slots] = batch.checksums
        col["widest"][slots] = np.maximum.reduceat(out.count, row_off[:-1])
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
        row_session = np.repeat(np.arange(len(hot)), out.groups)
        for js_l in by_policy.values():
            m = self._series(hot[js_l[0]])
            js = np.asarray(js_l)
            g, k, was, after = G[js], ks[js].astype(np.int64), before[js], now[js]
            m.seen.inc(int(k.sum()))
            evicted = int((was + g * k - after).sum())
            m.evicted.inc(evicted)
            m.retained.inc(int((after - was).sum()))
            observe_many(m.ratio, after / np.maximum(1, was + g * k))
            rows = slice(None) if len(by_policy) == 1 else np.isin(row_session, js)
            observe_many(m.mass, out.retained_mass[rows])
            if evicted:
                ages = out.evicted_age[rows].reshape(-1)
                observe_many(m.age, ages[ages > 0])
        return answers


def _objects(items: list[Any]) -> np.ndarray:
    """A 1-D object array of ``items`` (for the table's object columns)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _columnar(items: dict[int, StepInput | LazyInput]) -> BatchInput | None:
    """The inputs of one engine call in columnar form, when they all came in the batch wire form
    with one shape (see :meth:`LazyInputs.batch`); several RPCs' parts are concatenated. Else None."""
    parts: list[tuple[LazyInputs, list[int]]] = []
    for x in items.values():
        if not isinstance(x, LazyInput):
            return None
        if parts and parts[-1][0] is x.parent:
            parts[-1][1].append(x.j)
        else:
            parts.append((x.parent, [x.j]))
    batches = [p.batch(js) for p, js in parts]
    if any(b is None for b in batches):
        return None
    if len(batches) == 1:
        return batches[0]
    bs: list[BatchInput] = batches  # type: ignore[assignment]
    b0 = bs[0]
    if any(b.call != b0.call or b.attn.shape[1] != b0.attn.shape[1] or b.edge_pos.shape[1:] != b0.edge_pos.shape[1:]
           or b.priors.keys() != b0.priors.keys() for b in bs):
        return None
    return BatchInput(torch.cat([b.new_positions for b in bs]), torch.cat([b.attn for b in bs]),
                      torch.cat([b.last for b in bs]), torch.cat([b.edge_pos for b in bs]),
                      torch.cat([b.edge_w for b in bs]), [g for b in bs for g in b.groups],
                      {name: torch.cat([b.priors[name] for b in bs]) for name in b0.priors}, b0.call)


def _named(exc: BaseException, session_id: str) -> BaseException:
    """An engine field error (found on the device) as INVALID_ARGUMENT on ``steps[<id>].<proto field>``."""
    if isinstance(exc, FieldError) and not exc.field.startswith("steps["):
        return InvalidArgument(step_field(session_id, exc.field), exc.reason)
    return exc
