"""The gRPC status-code contract, idempotent retries and multi-session steps, over real loopback gRPC
against an in-process sidecar (real engine, real store)."""

from __future__ import annotations

import asyncio
import contextlib
import math

import grpc
import pytest
import torch
from nexus_client.errors import SidecarError
from nexus_client.packing import pack_step
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import tensor_from_proto, tensor_to_proto
from nexus_sidecar.engine import StepInput
from nexus_sidecar.server.app import Sidecar

from tests.server.conftest import (
    KEYS,
    SMALL,
    Planned,
    Reference,
    SimSession,
    arun,
    assert_same_answer,
    client,
    drive,
    expect_error,
    http,
    running_sidecar,
    sample_value,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)
IA, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


async def _opened(sc: Sidecar, sid: str = "s1", steps: int = 0, **cfg: object) -> SimSession:
    sim = SimSession(sid, config={**SMALL, **cfg})
    c = client(sc)
    await c.open_session(sid, sim.config)
    if steps:
        await drive(c, [sim], steps)
    await c.close()
    return sim


# -- INVALID_ARGUMENT ---------------------------------------------------------------------------
def test_invalid_argument_names_the_field() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            sim = await _opened(sc, steps=2)
            c = client(sc)

            bad = sim.make()
            bad.msg.attn.CopyFrom(tensor_to_proto(torch.zeros(1, 3, dtype=torch.int32)))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert "steps[s1].attn" in msg and "D_TYPE_INT32" in msg and "float16 or float32" in msg, msg

            bad = sim.make()
            width = bad.inp.attn.shape[1]
            bad.msg.last.CopyFrom(tensor_to_proto(torch.ones(1, width + 2)))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert "last" in msg and f"(1, {width + 2})" in msg and f"expected (1, {width})" in msg, msg

            bad = sim.make()
            bad.msg.edge_weight.data = bad.msg.edge_weight.data[:-4]  # truncated payload
            msg = await expect_error(c.step([bad.msg]), IA)
            assert "edge_weight" in msg and "bytes" in msg, msg

            bad = sim.make()
            attn = bad.inp.attn.clone()
            attn[0, 1] = math.nan
            bad.msg.attn.CopyFrom(tensor_to_proto(attn))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert "attn" in msg and "s1" in msg, msg

            bad = sim.make()
            bad.msg.ClearField("edge_index")
            msg = await expect_error(c.step([bad.msg]), IA)
            assert "steps[s1].edge_index" in msg and "required" in msg, msg

            # None of the rejected steps changed the session: the valid step 3 is still next.
            await drive(c, [sim], 1)
            assert (await c.get_session("s1")).step == 3

            msg = await expect_error(c.open_session("tight", {**SMALL, "budget": 5}), IA)
            assert "budget" in msg and "protected size" in msg, msg
            msg = await expect_error(c.open_session("bad id", SMALL), IA)
            assert "session_id" in msg and "' '" in msg, msg
            msg = await expect_error(c.open_session("p", {"policy": "no-such-policy"}), IA)
            assert "policy" in msg and "no-such-policy" in msg, msg

            p = sim.make()
            msg = await expect_error(c.step([p.msg, p.msg]), IA)
            assert "'s1'" in msg and "more than once" in msg, msg
            msg = await expect_error(c.step([]), IA)
            assert "steps" in msg and "empty" in msg, msg
            await c.close()

    arun(body())


def test_reduce_knobs_travel_both_ways_and_an_unknown_value_names_the_field() -> None:
    from nexus_sidecar.engine.errors import ConfigError
    from nexus_sidecar.server.codec import config_from_proto, config_to_proto

    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            opened = await c.open_session("m1", {**SMALL, "attn_reduce": "mean", "pool": 3, "pool_reduce": "mean"})
            assert opened.config.attn_reduce == pb.ATTN_REDUCE_MEAN
            assert opened.config.pool_reduce == pb.POOL_REDUCE_MEAN and opened.config.pool == 3
            assert (await c.get_session("m1")).config.attn_reduce == pb.ATTN_REDUCE_MEAN
            default = await c.open_session("d1", SMALL)
            assert default.config.attn_reduce == pb.ATTN_REDUCE_SUM  # the effective default is echoed
            assert default.config.pool_reduce == pb.POOL_REDUCE_MAX
            await c.close()

    arun(body())
    cfg = config_from_proto(pb.PolicyConfig(attn_reduce=pb.ATTN_REDUCE_MEAN, pool_reduce=pb.POOL_REDUCE_MEAN), "nexus")
    assert (cfg.attn_reduce, cfg.pool_reduce) == ("mean", "mean")
    assert config_from_proto(config_to_proto(cfg), "nexus") == cfg
    for field in ("attn_reduce", "pool_reduce", "prior"):
        with pytest.raises(ConfigError) as err:
            config_from_proto(pb.PolicyConfig(**{field: 7}), "nexus")  # a value from a newer client
        assert err.value.field == field


def test_priors_travel_and_are_checked_like_attn() -> None:
    from nexus_sidecar.server.codec import config_from_proto, config_to_proto

    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            opened = await c.open_session("n1", {**SMALL, "prior": "key_norm", "prior_mix": 0.25,
                                                 "prior_sharpness": 2.0})
            assert opened.config.prior == pb.PRIOR_KEY_NORM and opened.config.prior_mix == 0.25
            assert opened.config.prior_sharpness == 2.0
            default = await c.open_session("d1", SMALL)
            assert default.config.prior == pb.PRIOR_KEY_DIVERSITY and default.config.prior_mix == 1.0
            assert default.config.prior_sharpness == 0.5

            sim = SimSession("k1", config={**SMALL, "policy": "keydiff"}, priors=True)
            await c.open_session("k1", sim.config)
            await drive(c, [sim], 2)
            bad = sim.make()
            bad.msg.ClearField("key_diversity")
            msg = await expect_error(c.step([bad.msg]), IA)
            assert "steps[k1].key_diversity" in msg and "keydiff" in msg, msg
            for name, value in (("key_diversity", 1.5), ("key_norm", -1.0), ("value_norm", math.nan)):
                bad = sim.make()
                t = getattr(bad.inp, name).clone()
                t[0, 1] = value
                getattr(bad.msg, name).CopyFrom(tensor_to_proto(t))
                msg = await expect_error(c.step([bad.msg]), IA)
                assert f"steps[k1].{name}" in msg, msg
            bad = sim.make()
            bad.msg.key_norm.CopyFrom(tensor_to_proto(bad.inp.key_norm.to(torch.int32)))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert "steps[k1].key_norm" in msg and "float16 or float32" in msg, msg
            bad = sim.make()
            bad.msg.value_norm.CopyFrom(tensor_to_proto(bad.inp.value_norm[:, :-1]))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert "steps[k1].value_norm" in msg and "expected" in msg, msg
            # None of them changed the session; fp16 priors are accepted too.
            good = sim.make()
            good.msg.key_diversity.CopyFrom(tensor_to_proto(good.inp.key_diversity, torch.float16))
            (res,) = await c.step([good.msg])
            assert res.step == 3
            await c.close()

    arun(body())
    cfg = config_from_proto(pb.PolicyConfig(prior=pb.PRIOR_VALUE_NORM, prior_mix=1.0), "nexus")
    assert (cfg.prior, cfg.prior_mix) == ("value_norm", 1.0)
    assert config_from_proto(config_to_proto(cfg), "nexus") == cfg


# -- NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS -------------------------------------------------
def test_not_found_for_unknown_sessions() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            ghost = SimSession("ghost").make()
            NF = grpc.StatusCode.NOT_FOUND
            assert "'ghost'" in await expect_error(c.step([ghost.msg]), NF)
            assert "not found" in await expect_error(c.get_session("ghost"), NF)
            assert "'ghost'" in await expect_error(c.close_session("ghost"), NF)
            # A closed session is gone too.
            await _opened(sc, "gone", steps=1)
            assert await c.close_session("gone") == 1
            assert "'gone'" in await expect_error(c.get_session("gone"), NF)
            await c.close()

    arun(body())


def test_failed_precondition_out_of_order_and_mismatch() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            sim = await _opened(sc, steps=3)
            c = client(sc)
            gap = sim.make(step=5)
            msg = await expect_error(c.step([gap.msg]), FP)
            assert "step 5 is out of order" in msg and "expected step 4" in msg, msg
            old = sim.make(step=2)
            msg = await expect_error(c.step([old.msg]), FP)
            assert "step 2" in msg and "expected step 4" in msg, msg

            good = sim.make()
            wrong = pb.SessionStep()
            wrong.CopyFrom(good.msg)
            wrong.retained_count = good.msg.retained_count - 1
            msg = await expect_error(c.step([wrong]), FP)
            assert f"worker holds {good.msg.retained_count - 1} tokens" in msg, msg
            assert f"sidecar holds {good.msg.retained_count}" in msg and "at step 3" in msg, msg
            wrong.CopyFrom(good.msg)
            wrong.retained_checksum = (good.msg.retained_checksum + 1) % 2**64
            msg = await expect_error(c.step([wrong]), FP)
            assert f"{wrong.retained_checksum:#018x}" in msg and f"{good.msg.retained_checksum:#018x}" in msg, msg

            # The session is untouched: the correct step 4 applies.
            r = await c.step([good.msg])
            assert r[0].step == 4
            await c.close()

    arun(body())


def test_open_is_idempotent_and_conflicts_on_another_config() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            sim = await _opened(sc, steps=2)
            c = client(sc)
            again = await c.open_session("s1", SMALL)
            assert again.step == 2, "re-opening with the same config returns the current step"
            assert again.config.budget == SMALL["budget"] and again.config.policy == "nexus"
            msg = await expect_error(c.open_session("s1", {**SMALL, "budget": 32}),
                                     grpc.StatusCode.ALREADY_EXISTS)
            assert "'s1'" in msg and "different config" in msg, msg
            # The session kept its config and step.
            await drive(c, [sim], 1)
            assert (await c.get_session("s1")).config.budget == SMALL["budget"]
            await c.close()

    arun(body())


# -- RESOURCE_EXHAUSTED ------------------------------------------------------------------------------
def test_full_queue_is_resource_exhausted() -> None:
    async def body() -> None:
        # One waiting step fills the queue; the batch waits 300 ms for more, so the rest collide.
        async with running_sidecar(queue_size=1, max_delay_us=300_000) as sc:
            sims = [await _opened(sc, f"q{i}") for i in range(6)]
            c = client(sc)
            calls = [c.step([s.make().msg]) for s in sims]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            ok = [o for o in outcomes if isinstance(o, list)]
            errs = [o for o in outcomes if isinstance(o, Exception)]
            assert ok, outcomes
            assert errs and all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errs), errs
            assert all("queue is full" in e.details for e in errs), errs
            # A rejected session is not advanced: its step 1 still applies afterwards.
            for s, o in zip(sims, outcomes, strict=True):
                if isinstance(o, Exception):
                    assert (await c.step([s.make().msg]))[0].step == 1
            await c.close()

    arun(body())


def test_session_quota_is_resource_exhausted_per_tenant(keys_file) -> None:
    async def body() -> None:
        async with running_sidecar(max_sessions_per_tenant=1, keys_file=keys_file) as sc:
            acme, globex = client(sc, KEYS["acme"]), client(sc, KEYS["globex"])
            await acme.open_session("a1", SMALL)
            await acme.open_session("a1", SMALL)  # re-open of the same session is not a new one
            msg = await expect_error(acme.open_session("a2", SMALL), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "'acme'" in msg and "max_sessions_per_tenant" in msg, msg
            await globex.open_session("g1", SMALL)  # another tenant has its own quota
            await acme.close_session("a1")
            await acme.open_session("a2", SMALL)
            await acme.close()
            await globex.close()

    arun(body())


def test_max_budget_quota() -> None:
    async def body() -> None:
        async with running_sidecar(max_budget=100) as sc:
            c = client(sc)
            msg = await expect_error(c.open_session("big", {**SMALL, "budget": 101}),
                                     grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "101" in msg and "max_budget = 100" in msg, msg
            await c.close()

    arun(body())


# -- auth -----------------------------------------------------------------------------------------
def test_unauthenticated_and_permission_denied(keys_file) -> None:
    async def body() -> None:
        async with running_sidecar(keys_file=keys_file) as sc:
            UA = grpc.StatusCode.UNAUTHENTICATED
            anon = client(sc)
            assert "missing" in await expect_error(anon.open_session("s1", SMALL), UA)
            assert "missing" in await expect_error(anon.list_policies(), UA)
            stranger = client(sc, "not-a-configured-key-000000")
            assert "unknown API key" in await expect_error(stranger.open_session("s1", SMALL), UA)

            rw, ro = client(sc, KEYS["acme"]), client(sc, KEYS["acme-ro"])
            await rw.open_session("s1", SMALL)
            sim = SimSession("s1")
            msg = await expect_error(ro.step([sim.make().msg]), grpc.StatusCode.PERMISSION_DENIED)
            assert "'acme'" in msg and "read-only" in msg, msg
            msg = await expect_error(ro.close_session("s1"), grpc.StatusCode.PERMISSION_DENIED)
            assert "read-only" in msg
            # Reads are allowed, and see the same tenant's session.
            assert (await ro.get_session("s1")).step == 0
            assert await ro.list_policies()
            for c in (anon, stranger, rw, ro):
                await c.close()

    arun(body())


# -- DEADLINE_EXCEEDED ----------------------------------------------------------------------------------
def test_deadline_exceeded_step_is_not_computed() -> None:
    async def body() -> None:
        # The batch waits 400 ms to fill; the caller allows 100 ms.
        async with running_sidecar(max_delay_us=400_000) as sc:
            sim = await _opened(sc)
            ref = Reference()
            ref.open(sim)
            p = sim.make()
            fast = client(sc, timeout_s=0.1)
            await expect_error(fast.step([p.msg]), grpc.StatusCode.DEADLINE_EXCEEDED)
            async with http(sc) as h:
                async def server_saw_it() -> bool:
                    text = (await h.get("/metrics")).text
                    return sample_value(text, "nexus_request_duration_seconds_count", rpc="Step") == 1
                await wait_until(server_saw_it, 5, "the server to finish the expired Step")
                text = (await h.get("/metrics")).text
                assert sample_value(text, "nexus_request_duration_seconds_count", rpc="Step", code="OK") == 0, \
                    "an RPC that ran out of time must not be counted as OK"
            await asyncio.sleep(0.5)  # past the batch delay: the expired step would have run by now
            c = client(sc)
            assert (await c.get_session("s1")).step == 0, "an expired step must not be computed"
            # The batcher still serves, and the retry sees the untouched state (same as the engine).
            r = await c.step([p.msg])
            assert r[0].step == 1
            assert_same_answer(r[0], ref.step(sim, p), "retry after the deadline")
            await fast.close()
            await c.close()

    arun(body())


def test_deadline_during_engine_compute_keeps_the_session_consistent() -> None:
    """The caller's deadline passes while its step is inside the engine: the sidecar must still
    commit that step (or not run it at all), so the retry of the same step number is answered,
    and equals the engine's answer. (Before the fix the engine advanced, the session did not,
    and every retry failed INVALID_ARGUMENT on the attn shape.)"""
    cfg = {"policy": "nexus", "budget": 2000, "sinks": 2, "recent": 4, "fanout": 64, "iterations": 16, "seed": 1}

    async def body() -> None:
        async with running_sidecar() as sc:
            sim = SimSession("big", config=cfg)
            ref = Reference()
            ref.open(sim)
            c = client(sc, timeout_s=30)
            await c.open_session("big", cfg)
            k, F = 6000, 64
            new = torch.arange(k)
            g = torch.Generator().manual_seed(3)
            attn = torch.rand(1, k, generator=g)
            edges = (new.view(k, 1) - torch.arange(F).view(1, F)).clamp(min=0)[None]
            weights = torch.rand(1, k, F, generator=g)
            msg = pack_step(sim.ws, new, attn, attn, edges, weights)
            fast = client(sc, timeout_s=0.2)  # the engine needs longer than this for 6000 tokens
            with contextlib.suppress(SidecarError):
                await fast.step([msg])
            r = (await c.step([msg]))[0]
            assert r.step == 1
            out = ref.step(sim, Planned(msg, StepInput(new, attn, attn, edges, weights), new))
            assert_same_answer(r, out, "retry after a deadline during compute")
            assert (await c.get_session("big")).step == 1
            await fast.close()
            await c.close()

    arun(body())


# -- idempotency ----------------------------------------------------------------------------------------
def test_retry_returns_byte_identical_result_and_other_payload_fails() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            sim = await _opened(sc, steps=5)  # at the budget: the next step evicts
            c = client(sc)
            p = sim.make()
            first = (await c.step([p.msg]))[0]
            assert first.evicted[0].positions.shape[0] > 0, "the step should evict something"
            for _ in range(2):
                again = (await c.step([p.msg]))[0]
                assert again.SerializeToString() == first.SerializeToString()
            assert (await c.get_session("s1")).step == 6, "a retry must not advance the session"

            other = sim.make(k=2)  # same step number, different payload
            msg = await expect_error(c.step([other.msg]), FP)
            assert "different payload" in msg and "step 6" in msg, msg
            # ... also when only an optional prior differs (added, here).
            with_prior = pb.SessionStep()
            with_prior.CopyFrom(p.msg)
            with_prior.value_norm.CopyFrom(tensor_to_proto(torch.ones_like(p.inp.attn)))
            msg = await expect_error(c.step([with_prior]), FP)
            assert "different payload" in msg, msg
            # The worker continues normally after the retries.
            sim.apply(p, first)
            assert (await c.step([sim.make().msg]))[0].step == 7
            await c.close()

    arun(body())


# -- multi-session Step ----------------------------------------------------------------------------------
def test_multi_session_step_matches_the_engine() -> None:
    configs = [
        {**SMALL, "seed": 1},
        {**SMALL, "policy": "tova", "budget": 20},
        {**SMALL, "groups": 2, "budget": 18},
        {**SMALL, "policy": "h2o", "tau": math.inf},
        {**SMALL, "slack": 4, "seed": 99},
        # With the priors: the policy that needs one, Nexus mixing one in, and Nexus without (above).
        {**SMALL, "policy": "keydiff", "groups": 2, "budget": 16},
        {**SMALL, "seed": 1, "prior": "value_norm", "prior_mix": 0.7},
    ]
    with_priors = {5, 6}

    async def body() -> None:
        async with running_sidecar(max_batch=3) as sc:
            c = client(sc)
            ref = Reference()
            sims = []
            for i, cfg in enumerate(configs):
                sim = SimSession(f"m{i}", config=cfg, seed=i, priors=i in with_priors)
                await c.open_session(sim.session_id, cfg)
                ref.open(sim)
                sims.append(sim)
            # Request order differs from id order: results must follow the request.
            order = [sims[3], sims[5], sims[0], sims[4], sims[6], sims[2], sims[1]]
            history = await drive(c, order, 10, ref)
            assert sum(len(g.positions.data) for r in history[-1] for g in r.evicted) > 0
            for sim in sims:
                snap = await c.get_session(sim.session_id)
                assert snap.step == 10
                for gi, g in enumerate(snap.groups):
                    pos = tensor_from_proto(g.positions, field="positions").tolist()
                    assert g.positions.dtype == pb.D_TYPE_INT64
                    assert pos == sim.retained[gi].tolist()
                    assert pos == ref.engine.positions(ref.handles[sim.session_id])[gi].tolist()
            await c.close()

    arun(body())


def test_multi_session_step_with_one_bad_session() -> None:
    """A bad step in a batch fails the RPC naming that session; the others' retries are answered
    from their committed results, and nothing is applied twice."""

    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            ref = Reference()
            a, b = SimSession("a", seed=1), SimSession("b", seed=2)
            for s in (a, b):
                await c.open_session(s.session_id, s.config)
                ref.open(s)
            await drive(c, [a, b], 3, ref)
            pa, pb_ = a.make(), b.make()
            attn = pb_.inp.attn.clone()
            attn[0, 0] = -1.0
            bad = pb.SessionStep()
            bad.CopyFrom(pb_.msg)
            bad.attn.CopyFrom(tensor_to_proto(attn))
            msg = await expect_error(c.step([pa.msg, bad]), IA)
            assert "steps[b]" in msg and "attn" in msg, msg
            ra, rb = await c.step([pa.msg, pb_.msg])
            assert_same_answer(ra, ref.step(a, pa), "a step 4")
            assert_same_answer(rb, ref.step(b, pb_), "b step 4")
            assert ra.step == rb.step == 4
            await c.close()

    arun(body())


def test_list_policies() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            names = {p.name for p in await c.list_policies()}
            assert {"nexus", "tova", "h2o", "streaming"} <= names
            await c.close()

    arun(body())


def test_call_kinds_and_their_knobs_travel_and_answer_like_the_engine() -> None:
    from nexus_sidecar.server.codec import config_from_proto, config_to_proto

    knobs = {**SMALL, "policy": "nexus", "react_calls": "question", "prior_mix": 1.0, "question_prior_mix": 0.25}

    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            ref = Reference()
            sims = [SimSession(f"c{i}", config=knobs, seed=i, priors=True, call=call)
                    for i, call in enumerate(("unspecified", "context", "question", "decode"))]
            for sim in sims:
                opened = await c.open_session(sim.session_id, sim.config)
                assert opened.config.react_calls == pb.REACT_CALLS_QUESTION
                assert opened.config.question_prior_mix == 0.25
                ref.open(sim)
            await drive(c, sims, 5, ref)  # one RPC, four kinds: each answers as the engine alone
            default = await c.open_session("d", SMALL)
            assert default.config.react_calls == pb.REACT_CALLS_QUESTION
            assert not default.config.HasField("question_prior_mix")  # unset = prior_mix on every call
            bad = sims[1].make()
            bad.msg.call = 9  # a kind from a newer client
            msg = await expect_error(c.step([bad.msg]), IA)
            assert msg.startswith("steps[c1].call: ") and "9" in msg, msg
            await drive(c, sims, 1, ref)  # nothing was applied
            await c.close()

    arun(body())
    cfg = config_from_proto(pb.PolicyConfig(react_calls=pb.REACT_CALLS_QUESTION, question_prior_mix=0.0), "nexus")
    assert (cfg.react_calls, cfg.question_prior_mix) == ("question", 0.0)
    assert config_from_proto(config_to_proto(cfg), "nexus") == cfg
