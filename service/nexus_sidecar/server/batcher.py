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

from nexus_sidecar.engine import EngineError, StepInput, StepOutput
from nexus_sidecar.server.errors import DeadlineExpired, Draining, QueueFull
from nexus_sidecar.server.metrics import Metrics

RunBatch = Callable[[dict[int, StepInput]], Awaitable[dict[int, StepOutput | EngineError]]]


@dataclass
class Job:
    """One session step waiting for an engine call."""

    handle: int
    inp: StepInput
    tenant: str
    deadline: float | None  # time.monotonic() deadline, None = no deadline
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future[StepOutput | EngineError] = field(default_factory=lambda: asyncio.get_running_loop()
                                                             .create_future())


class MicroBatcher:
    """Bounded, tenant-fair queue in front of the engine."""

    def __init__(self, run_batch: RunBatch, metrics: Metrics, *, max_batch: int, max_delay_us: int,
                 queue_size: int) -> None:
        self._run_batch = run_batch
        self._metrics = metrics
        self.max_batch, self.max_delay = max_batch, max_delay_us / 1e6
        self.queue_size = queue_size
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()
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

    async def submit(self, job: Job) -> StepOutput | EngineError:
        """Queue a step and wait for its result."""
        if self._closing:
            raise Draining()
        if self._pending >= self.queue_size:
            raise QueueFull(f"step queue is full ({self.queue_size} steps waiting); retry with backoff")
        self._queues.setdefault(job.tenant, deque()).append(job)
        self._pending += 1
        self._metrics.queue_depth.set(self._pending)
        self._wake.set()
        return await job.future

    async def close(self) -> None:
        """Stop taking steps, finish everything queued, then stop the loop."""
        self._closing = True
        self._wake.set()
        if self._task:
            await self._task

    def _take(self) -> list[Job]:
        """Up to max_batch jobs, round-robin over tenants (oldest first within a tenant)."""
        batch: list[Job] = []
        while len(batch) < self.max_batch and self._queues:
            for tenant in list(self._queues):
                q = self._queues[tenant]
                batch.append(q.popleft())
                if not q:
                    del self._queues[tenant]
                if len(batch) == self.max_batch:
                    break
            # Rotate so the next batch starts with another tenant.
            if self._queues:
                self._queues.move_to_end(next(iter(self._queues)))
        self._pending -= len(batch)
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

    async def _flush(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            self._metrics.queue_seconds.observe(now - job.enqueued)
            if job.future.done():  # the caller was cancelled (e.g. its RPC deadline): nobody commits it
                continue
            if job.deadline is not None and now >= job.deadline:
                job.future.set_exception(DeadlineExpired("deadline passed while queued; step not computed"))
            else:
                live.append(job)
        if not live:
            return
        self._metrics.batch_sessions.observe(len(live))
        self.in_flight += len(live)
        try:
            outs = await self._run_batch({job.handle: job.inp for job in live})
        except BaseException as exc:  # an engine bug must not hang the callers
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        finally:
            self.in_flight -= len(live)
        for job in live:
            if not job.future.done():
                job.future.set_result(outs[job.handle])
