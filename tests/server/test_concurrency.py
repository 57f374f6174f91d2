"""Nothing races across threads: steps, opens, closes, idle unloads (the reaper), LRU unloads
(``make_room``) and resumes run concurrently against one in-process sidecar for a bounded time,
with the interpreter switching threads every 10 us instead of every 5 ms so that the event loop
and the engine thread interleave as often as they can. Every answer must equal the in-process
engine's and nothing may fail.

The bug this covers (issue 23, defect 1): ``Engine.pool_bytes`` iterated the engine's pool dict on
the event loop (``make_room``, admission, the reaper) while the engine thread added a pool ->
``RuntimeError: dictionary changed size during iteration`` -> INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sys
import time
from collections.abc import Iterator

import pytest
from nexus_client.client import AsyncNexusClient
from nexus_sidecar.server.app import Sidecar
from nexus_sidecar.server.metrics import MAINTENANCE_TASKS
from nexus_sidecar.server.sessions import SessionManager

from tests.server.conftest import (
    Reference,
    SimSession,
    arun,
    assert_same_answer,
    client,
    http,
    running_sidecar,
    sample_value,
)

pytestmark = pytest.mark.timeout(180)

RUN_S = 8.0  # how long the workers keep going (a bound on the test, not a timed assertion)
WORKERS = 4
# Widths of the first step: sessions land in different width classes (and two fan-outs), so pools
# are created, grown, migrated into and dropped (trim) while the event loop reads their sizes.
FIRST_K = (12, 90, 180, 300)
FANOUTS = (1, 2, 3, 4, 6, 8)


@contextlib.contextmanager
def fast_thread_switches() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _sim(worker: int, n: int, rng: random.Random) -> SimSession:
    cfg = {"policy": rng.choice(["nexus", "h2o"]), "budget": 48, "sinks": 2, "recent": 4,
           "fanout": rng.choice(FANOUTS), "groups": 3, "seed": worker * 1000 + n}
    return SimSession(f"w{worker}-s{n}", config=cfg, seed=worker * 1000 + n, k_first=rng.choice(FIRST_K), k=3)


def test_steps_opens_closes_unloads_and_reaper_race_free(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    counts = {"steps": 0, "opens": 0, "closes": 0, "idles": 0, "probes": 0}

    async def worker(c: AsyncNexusClient, ref: Reference, w: int, stop_at: float) -> None:
        rng = random.Random(w)
        n = 0
        live: list[SimSession] = []
        while time.monotonic() < stop_at:
            if len(live) < 3:  # open
                sim = _sim(w, n, rng)
                n += 1
                await c.open_session(sim.session_id, sim.config)
                ref.open(sim)
                live.append(sim)
                counts["opens"] += 1
                continue
            action = rng.random()
            if action < 0.2:  # close one; the next round opens a fresh one
                sim = live.pop(rng.randrange(len(live)))
                assert await c.close_session(sim.session_id) == sim.ws.step
                counts["closes"] += 1
            elif action < 0.3:  # idle past idle_session_s: the reaper unloads it, the next step resumes it
                counts["idles"] += 1
                await asyncio.sleep(rng.uniform(0.35, 0.6))
            else:  # one Step RPC carrying a step of one or more of this worker's sessions
                chosen = rng.sample(live, rng.randint(1, len(live)))
                plans = [s.make() for s in chosen]
                results = await c.step([p.msg for p in plans])
                for s, p, r in zip(chosen, plans, results, strict=True):
                    assert_same_answer(r, ref.step(s, p), f"{s.session_id} step {p.msg.step}")
                    s.apply(p, r)
                counts["steps"] += len(chosen)

    async def prober(sc: Sidecar, stop_at: float) -> None:
        """What else reads the engine from the event loop: the metrics page and admission."""
        cfg = _sim(99, 0, random.Random(0)).cfg
        async with http(sc) as h:
            while time.monotonic() < stop_at:
                assert (await h.get("/metrics")).status_code == 200
                for _ in range(20):  # as many admission checks as 20 Step RPCs make
                    sc.sessions.admission.open_fits(cfg)
                    await asyncio.sleep(0)
                counts["probes"] += 1
                await asyncio.sleep(0.002)

    async def body() -> str:
        # 1 MiB pool (the smallest budget) for ~12 sessions of up to 3 x 512 columns: opens and wide
        # steps need make_room to unload idle sessions; idle ones are reaped every 0.1 s.
        async with running_sidecar(pool_budget_mb=1, idle_session_s=0.3, maintenance_period_s=0.1,
                                   checkpoint_every=4) as sc:
            assert isinstance(sc.sessions, SessionManager)
            ref = Reference()
            stop_at = time.monotonic() + RUN_S
            clients = [client(sc, timeout_s=60) for _ in range(WORKERS)]
            try:
                with fast_thread_switches():
                    await asyncio.gather(*(worker(c, ref, w, stop_at) for w, c in enumerate(clients)),
                                         prober(sc, stop_at))
            finally:
                for c in clients:
                    await c.close()
            async with http(sc) as h:
                return (await h.get("/metrics")).text

    text = arun(body(), timeout=150)
    assert counts["steps"] > 0 and counts["closes"] > 0 and counts["idles"] > 0, counts
    # The paths under test really ran: idle sessions reaped, sessions unloaded to make room, resumed.
    assert sample_value(text, "nexus_sessions_expired_total") > 0, "the reaper never unloaded a session"
    assert sample_value(text, "nexus_sessions_unloaded_total") > 0, "make_room never unloaded a session"
    assert sample_value(text, "nexus_sessions_resumed_total") > 0, "no session was resumed"
    assert sample_value(text, "nexus_request_duration_seconds_count", code="INTERNAL") == 0
    assert sample_value(text, "nexus_steps_rejected_total") == 0
    for task in MAINTENANCE_TASKS:
        assert sample_value(text, "nexus_maintenance_errors_total", task=task) == 0, task
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


def test_a_failing_reaper_pass_is_logged_counted_and_reaping_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected error in one pass of the idle reaper (a fault injected into the pool trim it
    ends with) is logged with its traceback and counted; the next passes still unload idle sessions."""
    caplog.set_level(logging.WARNING)

    async def body() -> str:
        async with running_sidecar(idle_session_s=0.2, maintenance_period_s=0.05) as sc:
            real_trim, failures = sc.engine.trim, []

            def flaky_trim() -> int:
                if not failures:
                    failures.append(1)
                    raise RuntimeError("injected fault in trim")
                return real_trim()

            sc.engine.trim = flaky_trim  # type: ignore[method-assign]
            c = client(sc)
            sim = SimSession("idle-1")
            await c.open_session(sim.session_id, sim.config)
            ref = Reference()
            ref.open(sim)
            p = sim.make()
            (r,) = await c.step([p.msg])
            assert_same_answer(r, ref.step(sim, p))
            sim.apply(p, r)
            deadline = time.monotonic() + 20
            while sc.sessions.hot_sessions() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert failures, "the fault was never injected"
            assert not sc.sessions.hot_sessions(), "the reaper stopped after its failing pass"
            p = sim.make()  # the session resumes from its checkpoint and answers as the engine does
            (r,) = await c.step([p.msg])
            assert_same_answer(r, ref.step(sim, p))
            await c.close()
            async with http(sc) as h:
                return (await h.get("/metrics")).text

    text = arun(body(), timeout=60)
    assert sample_value(text, "nexus_maintenance_errors_total", task="reaper") == 1
    assert sample_value(text, "nexus_sessions_expired_total") >= 1
    logged = [r for r in caplog.records if "idle reaper: unexpected error" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
