"""Admission control: every limit refuses with RESOURCE_EXHAUSTED naming the limit and its value,
before anything is allocated; a full pool unloads idle sessions (checkpointed, LRU) first, and
the unloaded sessions resume with answers equal to the in-process engine's."""

from __future__ import annotations

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
    # 64 KiB-ish rows: SMALL has fanout 4 -> 29 + 48 = 77 bytes per slot; a 1 MiB budget holds
    # ~13,600 slots, i.e. 16-row pools up to ~850 columns wide.
    async def body() -> None:
        async with running_sidecar(pool_budget_mb=1, checkpoint_every=0) as sc:
            c = client(sc)
            ref = Reference()
            sims = [SimSession(f"s{i}", seed=i) for i in range(40)]
            for s in sims:
                await c.open_session(s.session_id, s.config)
                ref.open(s)
            await drive(c, sims, 3, ref)  # 40 sessions x 64 columns fit
            assert sc.engine.pool_bytes() <= 1 << 20
            # A wide prefill of a new session needs the pool ~690 columns wide: only possible after
            # unloading the idle ones (oldest first).
            wide = SimSession("wide", seed=99, k_first=500)
            await c.open_session("wide", wide.config)
            ref.open(wide)
            await drive(c, [wide], 2, ref)
            assert sc.engine.pool_bytes() <= 1 << 20
            unloaded = sample_value((await http(sc).get("/metrics")).text, "nexus_sessions_unloaded_total")
            assert unloaded >= 10, unloaded
            assert len(sc.sessions.hot_sessions()) < 41
            # Every unloaded session resumes from its checkpoint and continues exactly.
            await drive(c, sims[:8], 2, ref)
            await c.close()

    arun(body(), timeout=120)


def test_a_step_that_cannot_fit_is_refused_and_the_session_stays_usable() -> None:
    async def body() -> None:
        async with running_sidecar(pool_budget_mb=1) as sc:
            c = client(sc)
            sim = SimSession("s1")
            ref = Reference()
            await c.open_session("s1", sim.config)
            ref.open(sim)
            await drive(c, [sim], 2, ref)
            before = sc.engine.pool_bytes()
            k = 8000  # 16 rows x ~10,000 columns x 77 bytes: > 1 MiB even with nothing else hot
            new = torch.arange(sim.next_pos, sim.next_pos + k)
            n = int(sim.retained[0].numel())
            attn = torch.rand(1, n + k)
            msg = pack_step(sim.ws, new, attn, attn, torch.full((1, k, 4), -1), torch.zeros(1, k, 4))
            err = await expect_error(c.step([msg]), RE)
            assert err.startswith("limit pool_budget_mb = 1 exceeded: a step of 8000 new tokens"), err
            assert sc.engine.pool_bytes() == before
            await drive(c, [sim], 2, ref)
            await c.close()

    arun(body())
