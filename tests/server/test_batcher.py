"""MicroBatcher unit tests. ``run_batch`` is a fake coroutine (the unit seam between the batcher
and the engine thread), recording every batch it is handed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from nexus_sidecar.server.batcher import Job, MicroBatcher
from nexus_sidecar.server.errors import DeadlineExpired, Draining, QueueFull
from nexus_sidecar.server.metrics import Metrics

from tests.server.conftest import arun

pytestmark = pytest.mark.timeout(30)


class FakeEngine:
    """Records batches; answers each handle with ("out", handle); can be held closed."""

    def __init__(self, *, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        if not hold:
            self.gate.set()

    async def run_batch(self, items: dict[int, Any]) -> dict[int, Any]:
        self.batches.append(list(items))
        self.entered.set()
        await self.gate.wait()
        return {h: ("out", h, items[h]) for h in items}


def _batcher(engine: FakeEngine, **kw: Any) -> MicroBatcher:
    opts = {"max_batch": 4, "max_delay_us": 1_000_000, "queue_size": 1000, **kw}
    b = MicroBatcher(engine.run_batch, Metrics(), **opts)
    b.start()
    return b


def _job(handle: int, tenant: str = "t", deadline: float | None = None) -> Job:
    return Job({handle: f"inp{handle}"}, tenant, deadline)  # type: ignore[dict-item]


async def _one(b: MicroBatcher, job: Job) -> Any:
    """Submit a one-step job; its step's output."""
    return (await b.submit(job))[next(iter(job.items))]


def test_flushes_when_max_batch_is_reached() -> None:
    async def body() -> None:
        eng = FakeEngine()
        b = _batcher(eng, max_batch=4)  # max delay 1 s: only a full batch flushes early
        t0 = time.monotonic()
        outs = await asyncio.gather(*(_one(b, _job(h)) for h in range(4)))
        assert time.monotonic() - t0 < 0.5, "a full batch must not wait for max_delay"
        assert eng.batches == [[0, 1, 2, 3]]
        assert outs == [("out", h, f"inp{h}") for h in range(4)]
        await b.close()

    arun(body())


def test_flushes_after_max_delay() -> None:
    async def body() -> None:
        eng = FakeEngine()
        b = _batcher(eng, max_batch=64, max_delay_us=80_000)
        t0 = time.monotonic()
        out = await _one(b, _job(7))
        waited = time.monotonic() - t0
        assert out == ("out", 7, "inp7")
        assert 0.07 <= waited < 1.0, waited
        assert eng.batches == [[7]]
        await b.close()

    arun(body())


def test_bounded_queue_raises_queue_full() -> None:
    async def body() -> None:
        eng = FakeEngine()
        b = _batcher(eng, max_batch=64, queue_size=2)
        first = [asyncio.create_task(_one(b, _job(h))) for h in (1, 2)]
        await asyncio.sleep(0)
        assert b.pending == 2
        with pytest.raises(QueueFull, match="2 steps waiting"):
            await _one(b, _job(3))
        await b.close()  # drains the two queued steps
        assert [t.result() for t in first] == [("out", 1, "inp1"), ("out", 2, "inp2")]

    arun(body())


def test_round_robin_across_tenants() -> None:
    """A tenant with 100 queued steps delays another tenant's single step by at most one batch."""

    async def body() -> None:
        eng = FakeEngine(hold=True)
        b = _batcher(eng, max_batch=8, max_delay_us=50_000)
        busy = [asyncio.create_task(_one(b, _job(h, "busy"))) for h in range(100)]
        await asyncio.wait_for(eng.entered.wait(), 5)  # the first batch (all "busy") is in the engine
        assert eng.batches == [list(range(8))]
        lone = asyncio.create_task(_one(b, _job(1000, "lone")))
        await asyncio.sleep(0)
        eng.gate.set()
        assert await asyncio.wait_for(lone, 5) == ("out", 1000, "inp1000")
        assert 1000 in eng.batches[1], f"the lone tenant's step waited more than one batch: {eng.batches[:3]}"
        await asyncio.gather(*busy)
        assert sorted(h for batch in eng.batches for h in batch) == [*range(100), 1000]
        assert all(len(batch) <= 8 for batch in eng.batches)
        await b.close()

    arun(body())


def test_batches_interleave_three_tenants() -> None:
    async def body() -> None:
        eng = FakeEngine()
        b = _batcher(eng, max_batch=6)
        tasks = [asyncio.create_task(_one(b, _job(t * 100 + i, f"t{t}"))) for t in range(3) for i in range(4)]
        await asyncio.gather(*tasks)
        first = eng.batches[0]
        assert sorted(h // 100 for h in first) == [0, 0, 1, 1, 2, 2], eng.batches
        # Within a tenant, steps stay in submission order.
        for t in range(3):
            mine = [h for batch in eng.batches for h in batch if h // 100 == t]
            assert mine == sorted(mine)
        await b.close()

    arun(body())


def test_expired_deadline_is_not_computed() -> None:
    async def body() -> None:
        eng = FakeEngine()
        b = _batcher(eng, max_batch=64, max_delay_us=20_000)
        expired = asyncio.create_task(_one(b, _job(1, deadline=time.monotonic() + 0.005)))
        alive = asyncio.create_task(_one(b, _job(2, deadline=time.monotonic() + 30)))
        with pytest.raises(DeadlineExpired, match="not computed"):
            await expired
        assert await alive == ("out", 2, "inp2")
        assert eng.batches == [[2]], "the expired step must never reach the engine"
        await b.close()

    arun(body())


def test_cancelled_caller_is_not_computed_and_does_not_break_the_loop() -> None:
    async def body() -> None:
        eng = FakeEngine()
        b = _batcher(eng, max_batch=64, max_delay_us=50_000)
        gone = asyncio.create_task(_one(b, _job(1, deadline=time.monotonic() + 0.01)))
        await asyncio.sleep(0.02)
        gone.cancel()  # the RPC's deadline cancelled the handler before the flush
        await asyncio.sleep(0.1)
        assert eng.batches == []
        assert await asyncio.wait_for(_one(b, _job(2)), 5) == ("out", 2, "inp2")
        await b.close()

    arun(body())


def test_close_drains_then_refuses() -> None:
    async def body() -> None:
        eng = FakeEngine()
        b = _batcher(eng, max_batch=4)  # 1 s delay: close() must not wait for it
        tasks = [asyncio.create_task(_one(b, _job(h))) for h in range(10)]
        await asyncio.sleep(0)
        t0 = time.monotonic()
        await b.close()
        assert time.monotonic() - t0 < 0.5
        assert [t.result() for t in tasks] == [("out", h, f"inp{h}") for h in range(10)]
        assert [len(x) for x in eng.batches] == [4, 4, 2]
        with pytest.raises(Draining):
            await _one(b, _job(99))

    arun(body())


def test_engine_failure_fails_the_batch_not_the_loop() -> None:
    async def body() -> None:
        calls = 0

        async def flaky(items: dict[int, Any]) -> dict[int, Any]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("engine bug")
            return dict.fromkeys(items, "ok")

        b = MicroBatcher(flaky, Metrics(), max_batch=2, max_delay_us=1000, queue_size=10)
        b.start()
        results = await asyncio.gather(_one(b, _job(1)), _one(b, _job(2)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results), results
        assert await _one(b, _job(3)) == "ok"
        await b.close()

    arun(body())


def test_a_multi_session_job_is_split_over_batches_and_answered_whole() -> None:
    async def body() -> None:
        eng = FakeEngine()
        b = _batcher(eng, max_batch=4, max_delay_us=1000)
        job = Job({h: f"inp{h}" for h in range(10)}, "t", None)  # type: ignore[misc]
        lone = _job(100, "other")
        outs, single = await asyncio.gather(b.submit(job), _one(b, lone))
        assert outs == {h: ("out", h, f"inp{h}") for h in range(10)}
        assert single == ("out", 100, "inp100")
        assert all(len(x) <= 4 for x in eng.batches), eng.batches
        assert sorted(h for x in eng.batches for h in x) == [*range(10), 100]
        # The other tenant's step rode in the first or second batch, not after the whole job.
        assert any(100 in x for x in eng.batches[:2]), eng.batches
        await b.close()

    arun(body())


def test_a_started_job_is_finished_even_past_its_deadline() -> None:
    """Once part of a job reached the engine, the rest is computed too (the session layer commits
    all of it or none)."""

    async def body() -> None:
        eng = FakeEngine(hold=True)
        b = _batcher(eng, max_batch=2, max_delay_us=1000)
        job = Job({h: f"inp{h}" for h in range(4)}, "t", time.monotonic() + 0.05)  # type: ignore[misc]
        task = asyncio.create_task(b.submit(job))
        await asyncio.wait_for(eng.entered.wait(), 5)
        await asyncio.sleep(0.1)  # the deadline passes while the first half is in the engine
        eng.gate.set()
        assert sorted(await asyncio.wait_for(task, 5)) == [0, 1, 2, 3]
        await b.close()

    arun(body())
