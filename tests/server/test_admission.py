"""Admission control: every limit refuses with RESOURCE_EXHAUSTED naming the limit and its value,
before anything is allocated; a full pool unloads idle sessions (checkpointed, LRU) first, and
the unloaded sessions resume with answers equal to the in-process engine's."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from nexus_client.packing import pack_step

from tests.server.conftest import (
    SMALL,
    Reference,
    SimSession,
    arun,
    client,
    drive,
    expect_error,
    http,
    running_sidecar,
    sample_value,
    wait_until,
)

RE = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(("limits", "config", "limit_text"), [
    ({"max_groups": 4}, {"groups": 5}, "limit max_groups = 4 exceeded: groups = 5"),
    ({"max_fanout": 8}, {"fanout": 9}, "limit max_fanout = 8 exceeded: fanout = 9"),
    ({"max_session_slots": 1000}, {"groups": 2, "budget": 500, "slack": 1},
     "limit max_session_slots = 1000 exceeded: groups x (budget + slack) = 2 x (500 + 1) = 1002"),
    ({"max_budget": 100}, {"budget": 101}, "limit max_budget = 100 exceeded: budget = 101"),
])
def test_config_limits_refuse_before_allocation(limits: dict[str, int], config: dict[str, int],
                                                limit_text: str) -> None:
    async def body() -> None:
        async with running_sidecar(**limits) as sc:
            c = client(sc)
            before = sc.engine.pool_bytes()
            msg = await expect_error(c.open_session("big", {**SMALL, **config}), RE)
            assert msg == limit_text, msg
            assert sc.engine.pool_bytes() == before and len(sc.engine) == 0
            await c.open_session("ok", SMALL)  # the server is fine
            await c.close()

    arun(body())


def test_sessions_per_tenant_per_rpc_and_new_tokens_per_step() -> None:
    async def body() -> None:
        async with running_sidecar(max_sessions_per_tenant=3, max_sessions_per_rpc=2,
                                   max_new_tokens_per_step=16) as sc:
            c = client(sc)
            sims = [SimSession(f"s{i}") for i in range(3)]
            for s in sims:
                await c.open_session(s.session_id, s.config)
            msg = await expect_error(c.open_session("s3", SMALL), RE)
            assert msg.startswith("limit max_sessions_per_tenant = 3 exceeded"), msg
            msg = await expect_error(c.step([s.make().msg for s in sims]), RE)
            assert msg == "limit max_sessions_per_rpc = 2 exceeded: 3 steps", msg
            big = sims[0].make(k=17)
            msg = await expect_error(c.step([big.msg]), RE)
            assert msg == "limit max_new_tokens_per_step = 16 exceeded: steps[s0] carries 17 new tokens", msg
            await drive(c, sims[:2], 2)  # nothing was applied by the refusals
            text = (await http(sc).get("/metrics")).text
            assert sample_value(text, "nexus_steps_rejected_total", code="RESOURCE_EXHAUSTED") == 3 + 1
            await c.close()

    arun(body())


def test_a_full_pool_unloads_idle_sessions_lru_then_they_resume_exactly() -> None:
    # SMALL has fanout 4: 29 + 48 = 77 bytes per slot. Rows of the 64-column class: 128 rows take
    # 631 KB; the 129th session would double the pool to 256 rows (1.26 MB), over a 1 MiB budget,
    # so the least recently used idle sessions are checkpointed and unloaded to free rows first.
    async def body() -> None:
        async with running_sidecar(pool_budget_mb=1, checkpoint_every=0) as sc:
            c = client(sc)
            ref = Reference()
            sims = [SimSession(f"s{i}", seed=i, k_first=8) for i in range(128)]
            for s in sims:
                await c.open_session(s.session_id, s.config)
                ref.open(s)
            await drive(c, sims, 2, ref)
            await drive(c, sims[64:], 1, ref)  # s0..s63 are now the least recently used
            assert sc.engine.pool_bytes() <= 1 << 20
            late = [SimSession(f"late{i}", seed=500 + i, k_first=8) for i in range(8)]
            for s in late:
                await c.open_session(s.session_id, s.config)
                ref.open(s)
            await drive(c, late, 2, ref)
            assert sc.engine.pool_bytes() <= 1 << 20
            unloaded = sample_value((await http(sc).get("/metrics")).text, "nexus_sessions_unloaded_total")
            hot = {h.session_id for h in sc.sessions.hot_sessions()}
            assert unloaded >= 8 and all(f"s{i}" in hot for i in range(64, 128)), unloaded  # LRU: the old ones
            # Every unloaded session resumes from its checkpoint and continues exactly.
            await drive(c, sims[:8], 2, ref)
            await c.close()

    arun(body(), timeout=120)


def test_a_step_that_cannot_fit_is_refused_and_the_session_stays_usable() -> None:
    async def body() -> None:
        async with running_sidecar(pool_budget_mb=1, max_new_tokens_per_step=20_000) as sc:
            c = client(sc)
            sim = SimSession("s1")
            ref = Reference()
            await c.open_session("s1", sim.config)
            ref.open(sim)
            await drive(c, [sim], 2, ref)
            before = sc.engine.pool_bytes()
            k = 9000  # the 16,384-column class: 1 row x 16,384 x 77 bytes = 1.26 MB > 1 MiB
            new = torch.arange(sim.next_pos, sim.next_pos + k)
            n = int(sim.retained[0].numel())
            attn = torch.rand(1, n + k)
            msg = pack_step(sim.ws, new, attn, attn, torch.full((1, k, 4), -1), torch.zeros(1, k, 4))
            err = await expect_error(c.step([msg]), RE)
            assert err.startswith("limit pool_budget_mb = 1 exceeded: a step of 9000 new tokens"), err
            assert sc.engine.pool_bytes() == before
            await drive(c, [sim], 2, ref)
            await c.close()

    arun(body())


def _wide_step(sim: SimSession, k: int) -> object:
    new = torch.arange(sim.next_pos, sim.next_pos + k)
    n = int(sim.retained[0].numel())
    attn = torch.rand(1, n + k)
    return pack_step(sim.ws, new, attn, attn, torch.full((1, k, 4), -1), torch.zeros(1, k, 4))


@pytest.mark.parametrize("held_s", [0.1, None])
def test_a_full_pool_waits_for_a_stepping_session_then_unloads_it(held_s: float | None) -> None:
    """Session A holds the only row of the 8,192-column class (631 KB of a 1 MiB pool) and is
    stepping on another RPC (its lock held) when B's step needs a second row. B waits for A's step
    to end and unloads it instead of refusing; if A stays busy past ROOM_WAIT_S, B is refused with
    the pool budget's message and nothing changes."""
    async def body() -> None:
        async with running_sidecar(pool_budget_mb=1, max_new_tokens_per_step=20_000) as sc:
            c = client(sc)
            a, b = SimSession("a", seed=1), SimSession("b", seed=2)
            for s in (a, b):
                await c.open_session(s.session_id, s.config)
            await c.step([_wide_step(a, 5000)])  # A takes the 8,192-column row
            (hs_a,) = [h for h in sc.sessions.hot_sessions() if h.session_id == "a"]
            await hs_a.lock.acquire()  # A's step "in flight" on another RPC
            released = asyncio.get_running_loop().call_later(held_s, hs_a.lock.release) if held_s else None
            if released is None:
                msg = await expect_error(c.step([_wide_step(b, 5000)]), RE)
                assert msg.startswith("limit pool_budget_mb = 1 exceeded: a step of 5000 new tokens"), msg
                assert "a" in {h.session_id for h in sc.sessions.hot_sessions()}
                hs_a.lock.release()
            else:
                (rb,) = await c.step([_wide_step(b, 5000)])
                assert rb.session_id == "b" and not hs_a.lock.locked()
                assert "a" not in {h.session_id for h in sc.sessions.hot_sessions()}  # unloaded, checkpointed
                text = (await http(sc).get("/metrics")).text
                assert sample_value(text, "nexus_sessions_unloaded_total") == 1
            assert sc.engine.pool_bytes() <= 1 << 20
            await c.close()

    arun(body())


def test_closed_sessions_give_their_pool_memory_back() -> None:
    async def body() -> None:
        async with running_sidecar(maintenance_period_s=0.2) as sc:
            c = client(sc)
            sims = [SimSession(f"s{i}", seed=i, k_first=8) for i in range(100)]
            for s in sims:
                await c.open_session(s.session_id, s.config)
            await drive(c, sims, 1)
            full = sc.engine.pool_bytes()
            for s in sims[:96]:
                await c.close_session(s.session_id)
            # Closing frees rows; the periodic maintenance (every 0.2 s here) gives the memory back.
            await wait_until(lambda: sc.engine.pool_bytes() <= full // 4, 10, "the pool to shrink")
            await drive(c, sims[96:], 2)  # the survivors are unaffected
            await c.close()

    arun(body())
