"""Drill: CloseSession during a Redis outage. The close fails (UNAVAILABLE) and the session stays
as it was (served from hot state); once Redis is back (AOF: its data survived), the close goes
through, and the session never comes back: not on this replica, not on another one, not from
the old checkpoint a stale replica still holds."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from nexus_sidecar.server.checkpoint import load
from nexus_sidecar.server.stores import Fenced

from tests.server.conftest import SimSession, arun, client, drive, expect_error, running_sidecar, wait_until

pytestmark = pytest.mark.timeout(120)


def test_close_during_an_outage_fails_and_keeps_then_never_resurrects(redis_factory) -> None:
    rp = redis_factory("--appendonly", "yes", "--appendfsync", "always")
    procs: list[subprocess.Popen[bytes]] = []

    async def body() -> None:
        async with running_sidecar(store=rp.url, checkpoint_every=1, store_timeout_s=0.5) as sc:
            c = client(sc)
            sim = SimSession("c1", seed=3)
            await c.open_session("c1", sim.config)
            await drive(c, [sim], 4)
            old_epoch = sc.sessions.hot_sessions()[0].epoch

            def stored() -> list[bytes | None]:
                with rp.client() as r:
                    return r.hmget("nexus:{default:c1}:state", "blob", "delta", "full")

            # Checkpoints are written off the engine thread: wait for the one of step 3 or later.
            await wait_until(lambda: load(*stored()[:2]).checkpoint.step >= 3, timeout=10,
                             what="the checkpoint of step 3 in Redis")
            old_blob, old_delta, old_full = stored()

            rp.stop()  # Redis down
            msg = await expect_error(c.close_session("c1"), grpc.StatusCode.UNAVAILABLE)
            assert "unavailable" in msg, msg
            # Not closed: still hot, still answering.
            assert (await c.get_session("c1")).step == 4
            await drive(c, [sim], 1)

            procs.append(rp.restart("--appendonly", "yes"))  # Redis back, with its data
            assert await c.close_session("c1") == 5
            await expect_error(c.get_session("c1"), grpc.StatusCode.NOT_FOUND)
            await expect_error(c.step([sim.make().msg]), grpc.StatusCode.NOT_FOUND)
            # A stale replica's old checkpoint cannot bring it back.
            with pytest.raises(Fenced):
                await sc.store.put("default", "c1", 99, old_blob, epoch=old_epoch)
            assert old_delta is not None, "checkpoints after the first full one are deltas"
            with pytest.raises(Fenced):  # nor its old delta
                await sc.store.put("default", "c1", 99, old_delta, epoch=old_epoch, base=int(old_full))
            # Without an epoch check too: the tombstone dropped the full blob a delta needs.
            assert await sc.store.put("default", "c1", 99, old_delta, base=int(old_full)) is False
            await c.close()
        async with running_sidecar(store=rp.url) as other:  # nor can another replica
            c2 = client(other)
            await expect_error(c2.get_session("c1"), grpc.StatusCode.NOT_FOUND)
            assert "c1" not in await other.sessions.list_ids("default")
            await c2.close()

    try:
        arun(body())
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
