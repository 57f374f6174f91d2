"""The micro-batcher: merges session steps from many RPCs and workers into batched engine calls.

Flushes when ``max_batch`` steps wait or the oldest has waited ``max_delay_us``; the queue is
bounded (RESOURCE_EXHAUSTED when full); batches are filled round-robin across tenants so one
busy tenant cannot starve the others; a step whose deadline has passed is not computed. The
session layer allows one in-flight step per session, so a batch never holds two steps of one
session and per-session order is the order of the steps.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nexus_sidecar.server.errors import DeadlineExpired, Draining, QueueFull
from nexus_sidecar.server.metrics import Metrics

# A step's input is whatever the session layer's run_batch turns into an engine input on the engine
# thread (a StepInput, or a lazy one); the output whatever it hands back per handle.
RunBatch = Callable[[dict[int, Any]], Awaitable[dict[int, Any]]]


@dataclass
class Job:
    """The steps of one RPC (one per session) waiting for engine calls.

    The batcher may split a job over several engine calls (at most ``max_batch`` steps each); its
    future resolves once every step has its output, with a dict handle -> output.
    """

    items: dict[int, Any]  # handle -> engine input (see RunBatch)
    tenant: str
    deadline: float | None  # time.monotonic() deadline, None = no deadline
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future[dict[int, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    todo: deque[int] = field(init=False)  # handles not yet taken into a batch
    outs: dict[int, Any] = field(init=False, default_factory=dict)
    started: bool = False  # some of its steps reached the engine: the rest must follow, deadline or not

    def __post_init__(self) -> None:
        self.todo = deque(self.items)


class MicroBatcher:
    """Bounded, tenant-fair queue in front of the engine."""

    def __init__(self, run_batch: RunBatch, metrics: Metrics, *, max_batch: int, max_delay_us: int,
                 queue_size: int) -> None:
        self._run_batch = run_batch
        self._metrics = metrics
        self.max_batch, self.max_delay = max_batch, max_delay_us / 1e6
        self.queue_size = queue_size
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # jobs with steps not yet taken
        self._pending = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.in_flight = 0

    @property
    def pending(self) -> int:
        """Steps waiting (not yet in an engine call)."""
        return self._pending

    def start(self) -> None:
        """Start the flush loop on the running event loop."""
        self._task = asyncio.create_task(self._loop(), name="nexus-batcher")

    async def submit(self, job: Job) -> dict[int, Any]:
        """Queue a job's steps and wait for all their results."""
        if self._closing:
            raise Draining()
        if self._pending + len(job.items) > self.queue_size:
            raise QueueFull(f"step queue is full ({self._pending} steps waiting, queue_size = {self.queue_size}); "
                            "retry with backoff")
        if not job.items:
            return {}
        self._queues.setdefault(job.tenant, deque()).append(job)
        self._pending += len(job.items)
        self._metrics.queue_depth.set(self._pending)
        self._wake.set()
        return await job.future

    async def close(self) -> None:
        """Stop taking steps, finish everything queued, then stop the loop."""
        self._closing = True
        self._wake.set()
        if self._task:
            await self._task

    def _take(self) -> list[tuple[Job, list[int]]]:
        """Up to max_batch steps, round-robin over tenants (each gets an equal share of the room per
        round, oldest job first within a tenant); a job may be split over batches."""
        batch: list[tuple[Job, list[int]]] = []
        room = self.max_batch
        while room and self._queues:
            share = max(1, room // len(self._queues))
            for tenant in list(self._queues):
                q = self._queues[tenant]
                take = min(share, room)
                while take and q:
                    job = q[0]
                    n = min(take, len(job.todo))
                    batch.append((job, [job.todo.popleft() for _ in range(n)]))
                    take -= n
                    room -= n
                    if not job.todo:
                        q.popleft()
                if not q:
                    del self._queues[tenant]
                if not room:
                    break
            # Rotate so the next batch starts with another tenant.
            if self._queues:
                self._queues.move_to_end(next(iter(self._queues)))
        taken = sum(len(h) for _, h in batch)
        self._pending -= taken
        self._metrics.queue_depth.set(self._pending)
        return batch

    def _oldest(self) -> float:
        return min(q[0].enqueued for q in self._queues.values())

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Wait for a full batch or for the oldest step's delay to run out.
            while self._pending < self.max_batch and not self._closing:
                remaining = self._oldest() + self.max_delay - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            await self._flush(self._take())

    async def _flush(self, batch: list[tuple[Job, list[int]]]) -> None:
        now = time.monotonic()
        live: list[tuple[Job, list[int]]] = []
        for job, handles in batch:
            if job.future.done():  # the caller was cancelled (e.g. its RPC deadline): nobody commits it
                continue
            self._metrics.queue_seconds.observe(now - job.enqueued)
            if job.deadline is not None and now >= job.deadline and not job.started:
                job.future.set_exception(DeadlineExpired("deadline passed while queued; step not computed"))
            else:
                job.started = True
                live.append((job, handles))
        if not live:
            return
        size = sum(len(h) for _, h in live)
        self._metrics.batch_sessions.observe(size)
        self.in_flight += size
        try:
            outs = await self._run_batch({h: job.items[h] for job, handles in live for h in handles})
        except BaseException as exc:  # an engine bug must not hang the callers
            for job, _ in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            self.in_flight -= size
        for job, handles in live:
            if job.future.done():
                continue
            for h in handles:
                job.outs[h] = outs[h]
            if len(job.outs) == len(job.items):
                job.future.set_result(job.outs)
