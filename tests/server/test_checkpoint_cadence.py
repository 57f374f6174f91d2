"""Cadence checkpoints catch up: a step committed while the previous cadence checkpoint is still being
written (the store is slow) is checkpointed once that write finishes, not only at the session's next
step, which may never come (the worker went quiet, or is about to fail over)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import redis

from tests.server.conftest import SimSession, arun, client, running_sidecar, target, wait_until
from tests.server.test_redis_failover import _step_one, _stored_step

pytestmark = pytest.mark.timeout(120)


def test_a_step_committed_during_a_slow_checkpoint_is_checkpointed_after_it(redis_factory) -> None:
    rp = redis_factory()

    async def body() -> None:
        async with running_sidecar(store=rp.url, checkpoint_every=1) as sc:
            raw = redis.Redis.from_url(rp.url)
            sim = SimSession("cadence", seed=3)
            c = client(sc)
            await c.open_session(sim.session_id, sim.config)
            await c.close()
            await _step_one(target(sc), sim)
            await wait_until(lambda: _stored_step(raw, sim.session_id) == 1, 10, "the checkpoint of step 1")
            os.kill(rp.proc.pid, signal.SIGSTOP)  # the store hangs: step 2's checkpoint waits in its write
            try:
                await _step_one(target(sc), sim)  # served from hot state
                await _step_one(target(sc), sim)  # committed while that write is in flight
                await asyncio.sleep(0.3)
            finally:
                os.kill(rp.proc.pid, signal.SIGCONT)
            # No further step: the cadence catches up by itself.
            await wait_until(lambda: _stored_step(raw, sim.session_id) == 3, 15, "the checkpoint of step 3")
            raw.close()

    arun(body(), timeout=90)
