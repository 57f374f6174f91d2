"""The columnar ``StepBatch`` RPC over real loopback gRPC: the same answers and state as the
per-session ``Step``, idempotent retries across both forms, a precise INVALID_ARGUMENT for bad
input in every buffer (and nothing applied), tenants and auth as for ``Step``."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from nexus_client.client import AsyncNexusClient
from nexus_client.columnar import BatchAnswer, BatchBuilder, read_answer
from nexus_client.packing import checksum_of
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import tensor_from_proto, tensor_to_proto

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
    running_sidecar,
    sample_value,
)

pytestmark = pytest.mark.timeout(120)
IA = grpc.StatusCode.INVALID_ARGUMENT

CONFIGS = [
    {**SMALL, "seed": 1},
    {**SMALL, "policy": "tova", "budget": 20},
    {**SMALL, "groups": 2, "budget": 18},
    {**SMALL, "policy": "h2o", "tau": math.inf},
    {**SMALL, "slack": 4, "seed": 99, "fanout": 6},
]
PRIOR_CONFIGS = [{**SMALL, "policy": "keydiff", "groups": 2, "budget": 16},
                 {**SMALL, "seed": 1, "prior": "value_norm", "prior_mix": 0.7, "react_calls": "question",
                  "question_prior_mix": 0.25}]
CALLS = ("decode", "context", "question", "unspecified")


def batch_request(sims: list[SimSession], plans: list[Planned], float_dtype: torch.dtype = torch.float32
                  ) -> pb.StepBatchRequest:
    """The columnar form of the planned steps (the same tensors as their per-session messages)."""
    builder = BatchBuilder(float_dtype)
    for sim, p in zip(sims, plans, strict=True):
        i = p.inp
        builder.add(sim.ws, i.new_positions, i.attn, i.last, i.edge_pos, i.edge_w, step=p.msg.step, call=i.call,
                    **i.priors())
    return builder.request()


async def step_batch(c: AsyncNexusClient, sims: list[SimSession], plans: list[Planned]
                     ) -> tuple[pb.StepBatchRequest, BatchAnswer]:
    req = batch_request(sims, plans)
    return req, read_answer(await c.step_batch(req), req, [s.cfg.groups for s in sims])


async def drive_batch(c: AsyncNexusClient, sims: list[SimSession], steps: int, ref: Reference | None = None
                      ) -> list[list[pb.SessionResult]]:
    """Like ``drive``, with StepBatch RPCs; returns each step's answers in the per-session form."""
    history = []
    for _ in range(steps):
        plans = [s.make() for s in sims]
        _, answer = await step_batch(c, sims, plans)
        results = [answer.session_result(b, s.session_id) for b, s in enumerate(sims)]
        for s, p, r in zip(sims, plans, results, strict=True):
            if ref is not None:
                assert_same_answer(r, ref.step(s, p), f"{s.session_id} step {p.msg.step}")
            s.apply(p, r)
            # The running checksum, computed for the whole batch, is the worker's own.
            assert r.retained_checksum == checksum_of(s.retained), f"{s.session_id} step {p.msg.step}"
        history.append(results)
    return history


def _without_id(r: pb.SessionResult) -> bytes:
    copy = pb.SessionResult()
    copy.CopyFrom(r)
    copy.session_id = ""
    return copy.SerializeToString()


async def _snapshot(c: AsyncNexusClient, sid: str) -> tuple[int, int, int, list[list[int]], list[list[float]]]:
    snap = await c.get_session(sid, include_weights=True)
    return (snap.step, snap.retained_count, snap.retained_checksum,
            [tensor_from_proto(g.positions, field="p").tolist() for g in snap.groups],
            [tensor_from_proto(g.weights, field="w").tolist() for g in snap.groups])


# -- equivalence ------------------------------------------------------------------------------------
@pytest.mark.parametrize("configs,priors", [(CONFIGS, False), (PRIOR_CONFIGS, True)], ids=["plain", "priors"])
def test_batch_and_per_session_forms_give_the_same_answers_and_state(configs: list[dict[str, object]],
                                                                      priors: bool) -> None:
    async def body() -> None:
        async with running_sidecar(max_batch=3) as sc:  # max_batch 3: batches split over engine calls
            c = client(sc)
            ref = Reference()
            per_session = [SimSession(f"p{i}", config=cfg, seed=i, priors=priors, call=CALLS[i % 4])
                           for i, cfg in enumerate(configs)]
            columnar = [SimSession(f"c{i}", config=cfg, seed=i, priors=priors, call=CALLS[i % 4])
                        for i, cfg in enumerate(configs)]
            for sim in per_session + columnar:
                await c.open_session(sim.session_id, sim.config)
            for sim in columnar:
                ref.open(sim)
            a = await drive(c, per_session, 9)
            b = await drive_batch(c, columnar, 9, ref)
            assert sum(len(g.positions.data) for r in b[-1] for g in r.evicted) > 0, "the run should evict"
            for step_a, step_b in zip(a, b, strict=True):
                assert [_without_id(r) for r in step_a] == [_without_id(r) for r in step_b]
            for p, q in zip(per_session, columnar, strict=True):
                assert await _snapshot(c, p.session_id) == await _snapshot(c, q.session_id)
            await c.close()

    arun(body())


def test_retries_are_answered_alike_in_both_forms() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            sims = [SimSession(f"r{i}", seed=i, config={**SMALL, "seed": i}) for i in range(3)]
            for sim in sims:
                await c.open_session(sim.session_id, sim.config)
            await drive_batch(c, sims, 5)
            plans = [s.make() for s in sims]
            req = batch_request(sims, plans)
            first = await c.step_batch(req)
            again = await c.step_batch(req)
            assert again.SerializeToString() == first.SerializeToString()
            answer = read_answer(first, req, [1, 1, 1])
            assert answer.evicted.size > 0
            # The per-session form of the same steps is a retry too: the same answers.
            per_session = await c.step([p.msg for p in plans])
            assert [r.SerializeToString() for r in per_session] == \
                [answer.session_result(b, s.session_id).SerializeToString() for b, s in enumerate(sims)]
            # A partial retry mixed with fresh steps: the retried ones from the cache, the others computed.
            for b, (s, p) in enumerate(zip(sims, plans, strict=True)):
                if b:
                    s.apply(p, answer.session_result(b, s.session_id))
            mixed = [plans[0], sims[1].make(), sims[2].make()]
            _, mixed_answer = await step_batch(c, sims, mixed)
            assert mixed_answer.steps.tolist() == [6, 7, 7]
            assert mixed_answer.session_result(0, "r0").SerializeToString() == \
                answer.session_result(0, "r0").SerializeToString()
            # Same step number, another payload: FAILED_PRECONDITION, in either form.
            other = sims[0].make(k=2)
            msg = await expect_error(c.step_batch(batch_request(sims[:1], [other])),
                                     grpc.StatusCode.FAILED_PRECONDITION)
            assert "different payload" in msg and "r0" in msg, msg
            await c.close()

    arun(body())


def test_fp16_summaries_travel_in_the_batch_form() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            sims = [SimSession(f"h{i}", seed=i) for i in range(2)]
            for sim in sims:
                await c.open_session(sim.session_id, sim.config)
            plans = [s.make() for s in sims]
            req = batch_request(sims, plans, torch.float16)
            assert req.attn.dtype == pb.D_TYPE_FLOAT16 and req.new_positions.dtype == pb.D_TYPE_INT32
            answer = read_answer(await c.step_batch(req), req, [1, 1])
            assert answer.steps.tolist() == [1, 1]
            await c.close()

    arun(body())


# -- bad input in every buffer --------------------------------------------------------------------------
def _col(req: pb.StepBatchRequest, name: str, dtype: str) -> np.ndarray:
    return np.frombuffer(getattr(req, name), dtype=dtype).copy()


def _set_tensor(req: pb.StepBatchRequest, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    t = getattr(req, name)
    ints = t.dtype in (pb.D_TYPE_INT32, pb.D_TYPE_INT64)
    t.CopyFrom(tensor_to_proto(fn(tensor_from_proto(t, field=name, as_dtype=torch.int64 if ints else None))))


def _offsets(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[pb.StepBatchRequest], None]:
    def mutate(req: pb.StepBatchRequest) -> None:
        setattr(req, name, fn(_col(req, name, "<i8")).astype("<i8").tobytes())
    return mutate


def _raw(name: str, fn: Callable[[bytes], bytes]) -> Callable[[pb.StepBatchRequest], None]:
    def mutate(req: pb.StepBatchRequest) -> None:
        setattr(req, name, fn(getattr(req, name)))
    return mutate


def _value(name: str, index: int, value: float) -> Callable[[pb.StepBatchRequest], None]:
    def mutate(req: pb.StepBatchRequest) -> None:
        def change(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            t[index] = value
            return t
        _set_tensor(req, name, change)
    return mutate


def _swap_last_two(req: pb.StepBatchRequest) -> None:
    off = _col(req, "slot_offsets", "<i8")
    off[1], off[2] = off[2], off[1]
    req.slot_offsets = off.astype("<i8").tobytes()


def _no_new_token(req: pb.StepBatchRequest) -> None:
    off = _col(req, "token_offsets", "<i8")
    tok = tensor_from_proto(req.new_positions, field="p")
    keep = torch.ones(tok.numel(), dtype=torch.bool)
    keep[off[1] - 3: off[1]] = False  # drop session 0's three new tokens
    req.new_positions.CopyFrom(tensor_to_proto(tok[keep].to(torch.int32)))
    off[1:] -= 3
    req.token_offsets = off.astype("<i8").tobytes()


def _clear(name: str) -> Callable[[pb.StepBatchRequest], None]:
    return lambda req: req.ClearField(name)


def _dtype(name: str, torch_dtype: torch.dtype) -> Callable[[pb.StepBatchRequest], None]:
    return lambda req: _set_tensor(req, name, lambda t: t.to(torch_dtype))


def _reshape(name: str) -> Callable[[pb.StepBatchRequest], None]:
    def mutate(req: pb.StepBatchRequest) -> None:
        t = getattr(req, name)
        t.shape[:] = [1, t.shape[0]]
    return mutate


def _truncate(name: str) -> Callable[[pb.StepBatchRequest], None]:
    def mutate(req: pb.StepBatchRequest) -> None:
        t = getattr(req, name)
        t.data = t.data[:-4]
    return mutate


def _bad_call(req: pb.StepBatchRequest) -> None:
    req.calls = bytes([3, 9])


def _duplicate_id(req: pb.StepBatchRequest) -> None:
    req.session_ids[1] = req.session_ids[0]


def _bad_id(req: pb.StepBatchRequest) -> None:
    req.session_ids[1] = "b d"


def _retained_slots(req: pb.StepBatchRequest) -> None:
    n = _col(req, "retained_slots", "<u4")
    n[1] += 1
    req.retained_slots = n.astype("<u4").tobytes()


# (mutation, expected field prefix of the message, a word the reason must contain). Session 1 is "b1".
BAD_INPUTS: dict[str, tuple[Callable[[pb.StepBatchRequest], None], str, str]] = {
    "session_ids empty": (lambda r: r.ClearField("session_ids"), "session_ids: ", "empty"),
    "session_ids duplicate": (_duplicate_id, "steps: ", "more than once"),
    "session_ids whitespace": (_bad_id, "session_id: ", "' '"),
    "steps length": (_raw("steps", lambda d: d[:-1]), "steps: ", "bytes"),
    "retained_counts length": (_raw("retained_counts", lambda d: d + b"\0"), "retained_counts: ", "bytes"),
    "retained_checksums length": (_raw("retained_checksums", lambda d: d[:8]), "retained_checksums: ", "bytes"),
    "retained_slots length": (_raw("retained_slots", lambda d: b""), "retained_slots: ", "bytes"),
    "retained_slots value": (_retained_slots, "steps[b1].attn: ", "expected shape"),
    "token_offsets length": (_raw("token_offsets", lambda d: d[:-8]), "token_offsets: ", "B + 1"),
    "token_offsets start": (_offsets("token_offsets", lambda o: o + 1), "token_offsets: ", "start at 0"),
    "token_offsets end": (_offsets("token_offsets", lambda o: np.r_[o[:-1], o[-1] - 1]), "token_offsets: ",
                          "new_positions has"),
    "token_offsets no new token": (_no_new_token, "steps[b0].new_positions: ", "at least one new token"),
    "slot_offsets not monotone": (_swap_last_two, "slot_offsets: ", "must not decrease"),
    "slot_offsets end": (_offsets("slot_offsets", lambda o: np.r_[o[:-1], o[-1] + 5]), "slot_offsets: ", "ends at"),
    "edge_offsets shifted": (_offsets("edge_offsets", lambda o: np.r_[o[0], o[1:-1] + 4, o[-1]]),
                             "steps[b0].edge_index: ", "expected shape"),
    "edge_offsets length": (_raw("edge_offsets", lambda d: d + d[:8]), "edge_offsets: ", "bytes"),
    "new_positions missing": (_clear("new_positions"), "new_positions: ", "required"),
    "new_positions float": (_dtype("new_positions", torch.float32), "new_positions: ", "int32 or int64"),
    "new_positions 2-D": (_reshape("new_positions"), "new_positions: ", "1-D"),
    "new_positions truncated": (_truncate("new_positions"), "new_positions: ", "bytes"),
    "new_positions 2^62": (_value("new_positions", 0, 2**62), "steps[b0].new_positions: ", "2^62"),
    "new_positions not ascending": (_value("new_positions", -1, 0), "steps[b1].new_positions: ", "ascending"),
    "attn missing": (_clear("attn"), "attn: ", "required"),
    "attn int": (_dtype("attn", torch.int32), "attn: ", "float16 or float32"),
    "attn NaN": (_value("attn", -2, math.nan), "steps[b1].attn: ", "NaN"),
    "attn negative": (_value("attn", 0, -1.0), "steps[b0].attn: ", "negative"),
    "attn truncated": (_truncate("attn"), "attn: ", "bytes"),
    "last Inf": (_value("last", 3, math.inf), "steps[b0].last: ", "Inf"),
    "last missing": (_clear("last"), "last: ", "required"),
    "edge_index -2": (_value("edge_index", -1, -2), "steps[b1].edge_index: ", "2^62"),
    "edge_index outside the cache": (_value("edge_index", 0, 10_000), "steps[b0].edge_index: ", "outside the cache"),
    "edge_index float": (_dtype("edge_index", torch.float16), "edge_index: ", "int32 or int64"),
    "edge_weight negative": (_value("edge_weight", 1, -0.5), "steps[b0].edge_weight: ", "negative"),
    "edge_weight truncated": (_truncate("edge_weight"), "edge_weight: ", "bytes"),
    "edge_weight missing": (_clear("edge_weight"), "edge_weight: ", "required"),
    "calls unknown kind": (_bad_call, "steps[b1].call: ", "unknown call kind 9"),
    "calls length": (_raw("calls", lambda d: bytes([1, 1, 1])), "calls: ", "bytes"),
}
PRIOR_BAD: dict[str, tuple[Callable[[pb.StepBatchRequest], None], str, str]] = {
    "key_diversity out of range": (_value("key_diversity", 2, 1.5), "steps[b0].key_diversity: ", "outside"),
    "key_norm negative": (_value("key_norm", -1, -3.0), "steps[b1].key_norm: ", "negative"),
    "value_norm NaN": (_value("value_norm", 0, math.nan), "steps[b0].value_norm: ", "NaN"),
    "value_norm short": (_offsets("slot_offsets", lambda o: o), "", ""),  # placeholder replaced below
    "key_norm missing for keydiff": (_clear("key_diversity"), "steps[b1].key_diversity: ", "keydiff"),
}


def _shorten_value_norm(req: pb.StepBatchRequest) -> None:
    req.value_norm.CopyFrom(tensor_to_proto(tensor_from_proto(req.value_norm, field="v")[:-1]))


PRIOR_BAD["value_norm short"] = (_shorten_value_norm, "slot_offsets: ", "but value_norm has")


# Found by the engine on the device (values), per session: the bad session changes nothing, the others
# of the RPC are applied (a retry answers them from their cache), as for the per-session form.
ON_DEVICE = {"new_positions not ascending", "attn NaN", "attn negative", "last Inf", "edge_index outside the cache",
             "edge_weight negative", "key_diversity out of range", "key_norm negative", "value_norm NaN"}


def _bad_session(prefix: str) -> int:
    return int(prefix.split("]")[0][-1])  # "steps[b1].attn: " -> 1


def _check_bad_inputs(cases: dict[str, tuple[Callable[[pb.StepBatchRequest], None], str, str]], priors: bool,
                      configs: list[dict[str, object]]) -> None:
    async def opened(c: AsyncNexusClient) -> tuple[list[SimSession], list[Planned], list[tuple[object, ...]]]:
        sims = [SimSession(f"b{i}", config=cfg, seed=i, priors=priors) for i, cfg in enumerate(configs)]
        for sim in sims:
            await c.open_session(sim.session_id, sim.config)
        await drive_batch(c, sims, 3)
        return sims, [s.make() for s in sims], [await _snapshot(c, s.session_id) for s in sims]

    async def host_cases() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            sims, plans, before = await opened(c)
            checked = 0
            for name, (mutate, prefix, word) in cases.items():
                if name in ON_DEVICE:
                    continue
                req = batch_request(sims, plans)
                mutate(req)
                msg = await expect_error(c.step_batch(req), IA)
                assert msg.startswith(prefix) and word in msg, f"{name}: {msg}"
                assert len(msg) < 400, f"{name}: {msg}"
                # Nothing was applied, to any session of the batch.
                assert [await _snapshot(c, s.session_id) for s in sims] == before, name
                checked += max(1, len(req.session_ids))  # every step of a refused RPC counts as rejected
            _, answer = await step_batch(c, sims, plans)  # the good payload still applies, as step 4
            assert answer.steps.tolist() == [4] * len(sims)
            text = (await _metrics(sc)).text
            assert sample_value(text, "nexus_steps_rejected_total", code="INVALID_ARGUMENT") == checked
            await c.close()

    async def device_case(mutate: Callable[[pb.StepBatchRequest], None], prefix: str, word: str, name: str) -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            sims, plans, before = await opened(c)
            req = batch_request(sims, plans)
            mutate(req)
            msg = await expect_error(c.step_batch(req), IA)
            assert msg.startswith(prefix) and word in msg, f"{name}: {msg}"
            bad = _bad_session(prefix)
            assert await _snapshot(c, sims[bad].session_id) == before[bad], f"{name}: the bad session changed"
            req, answer = await step_batch(c, sims, plans)  # the good payload: the bad one applies now
            assert answer.steps.tolist() == [4] * len(sims)
            again = read_answer(await c.step_batch(req), req, [s.cfg.groups for s in sims])
            assert all(again.session_result(b, "x") == answer.session_result(b, "x") for b in range(len(sims)))
            await c.close()

    arun(host_cases(), timeout=110)
    for name, (mutate, prefix, word) in cases.items():
        if name in ON_DEVICE:
            arun(device_case(mutate, prefix, word, name))


async def _metrics(sc: object):  # type: ignore[no-untyped-def]
    from tests.server.conftest import http

    async with http(sc) as h:  # type: ignore[arg-type]
        return await h.get("/metrics")


def test_bad_input_in_every_buffer_is_invalid_argument_and_changes_nothing() -> None:
    # Two sessions with the same groups (so an offset shifted by whole values stays inside the buffer).
    _check_bad_inputs(BAD_INPUTS, False, [{**SMALL, "seed": 1}, {**SMALL, "seed": 2}])


def test_bad_priors_are_invalid_argument_and_change_nothing() -> None:
    _check_bad_inputs(PRIOR_BAD, True, [{**SMALL, "seed": 1, "prior": "value_norm"},
                                        {**SMALL, "policy": "keydiff", "seed": 2}])


def test_limits_and_status_codes_hold_for_the_batch_form() -> None:
    async def body() -> None:
        async with running_sidecar(max_new_tokens_per_step=8, max_sessions_per_rpc=2) as sc:
            c = client(sc)
            sims = [SimSession(f"l{i}", seed=i, k_first=4) for i in range(3)]
            for sim in sims:
                await c.open_session(sim.session_id, sim.config)
            msg = await expect_error(c.step_batch(batch_request(sims, [s.make() for s in sims])),
                                     grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "max_sessions_per_rpc" in msg, msg
            big = sims[0].make(k=9)
            msg = await expect_error(c.step_batch(batch_request(sims[:1], [big])), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert msg == "limit max_new_tokens_per_step = 8 exceeded: steps[l0] carries 9 new tokens", msg
            late = sims[0].make(step=3)
            msg = await expect_error(c.step_batch(batch_request(sims[:1], [late])), grpc.StatusCode.FAILED_PRECONDITION)
            assert "expected step 1" in msg, msg
            ghost = SimSession("ghost")
            await expect_error(c.step_batch(batch_request([ghost], [ghost.make()])), grpc.StatusCode.NOT_FOUND)
            wrong = sims[1].make()
            sims[1].ws.retained_count = 5  # the worker claims state the sidecar does not have
            msg = await expect_error(c.step_batch(batch_request(sims[1:2], [wrong])),
                                     grpc.StatusCode.FAILED_PRECONDITION)
            assert "diverged" in msg, msg
            await c.close()

    arun(body())


# -- tenants and auth ----------------------------------------------------------------------------------
def test_tenants_and_auth_hold_for_the_batch_form(keys_file: Path) -> None:
    async def body() -> None:
        async with running_sidecar(keys_file=keys_file) as sc:
            acme, globex = client(sc, KEYS["acme"]), client(sc, KEYS["globex"])
            ro, anon = client(sc, KEYS["acme-ro"]), client(sc)
            a = [SimSession(f"t{i}", seed=i) for i in range(2)]
            g = SimSession("t0", seed=7, config={**SMALL, "budget": 30})
            for sim in a:
                await acme.open_session(sim.session_id, sim.config)
            await globex.open_session("t0", g.config)
            await drive_batch(acme, a, 3)
            await drive_batch(globex, [g], 1)  # the same id under another tenant is another session
            assert (await acme.get_session("t0")).step == 3 and (await globex.get_session("t0")).step == 1
            plans = [s.make() for s in a]
            await expect_error(globex.step_batch(batch_request(a[1:], plans[1:])), grpc.StatusCode.NOT_FOUND)
            await expect_error(ro.step_batch(batch_request(a, plans)), grpc.StatusCode.PERMISSION_DENIED)
            await expect_error(anon.step_batch(batch_request(a, plans)), grpc.StatusCode.UNAUTHENTICATED)
            _, answer = await step_batch(acme, a, plans)
            assert answer.steps.tolist() == [4, 4]
            text = (await _metrics(sc)).text
            assert sample_value(text, "nexus_tokens_seen_total", tenant="acme") == sum(s.next_pos for s in a) + \
                sum(int(p.new.numel()) for p in plans)
            assert sample_value(text, "nexus_tokens_seen_total", tenant="globex") == g.next_pos
            for cl in (acme, globex, ro, anon):
                await cl.close()

    arun(body())


def test_observe_many_counts_like_observe() -> None:
    from nexus_sidecar.server.metrics import observe_many
    from prometheus_client import CollectorRegistry, Histogram

    reg = CollectorRegistry()
    one = Histogram("one", "x", buckets=(0.1, 0.5, 1.0, 4.0), registry=reg)
    many = Histogram("many", "x", buckets=(0.1, 0.5, 1.0, 4.0), registry=reg)
    values = np.array([0.0, 0.1, 0.10001, 0.5, 0.7, 1.0, 3.9, 4.0, 4.5, 100.0, 0.3])
    for v in values.tolist():
        one.observe(v)
    observe_many(many, values)
    observe_many(many, np.zeros(0))

    def samples(name: str) -> list[tuple[str, float]]:
        return [(s.name.removeprefix(name), s.value) for m in reg.collect() if m.name == name
                for s in m.samples if not s.name.endswith("_created")]

    assert samples("one") == samples("many")
    assert dict(samples("one"))["_count"] == values.size


def test_merged_and_split_rpcs_take_the_columnar_entry_with_the_same_answers() -> None:
    # Two workers' StepBatch RPCs of 3 sessions each, max_batch 4 and a long batching delay: engine
    # calls take 3 + 1 sessions of two RPCs, then the other 2 (jobs split and merged). Every session
    # has the same shape (the steady state), so those calls run Engine.step_batch's one native call;
    # every answer must still be the in-process engine's, step by step.
    async def body() -> None:
        async with running_sidecar(max_batch=4, max_delay_us=20_000) as sc:
            sizes: list[int] = []
            real = sc.engine._step_columnar

            def counted(handles, inp):  # type: ignore[no-untyped-def]
                out = real(handles, inp)
                if out is not None:
                    sizes.append(len(handles))
                return out

            sc.engine._step_columnar = counted  # type: ignore[method-assign]
            ref = Reference()
            workers = [[SimSession(f"w{w}-s{i}", config={**SMALL, "seed": 10 * w + i}, seed=10 * w + i)
                        for i in range(3)] for w in range(2)]
            clients = [client(sc) for _ in workers]
            for c, sims in zip(clients, workers, strict=True):
                for sim in sims:
                    await c.open_session(sim.session_id, sim.config)
                    ref.open(sim)
            runs = await asyncio.gather(*(drive_batch(c, sims, 8, ref)
                                          for c, sims in zip(clients, workers, strict=True)))
            assert all(sum(len(g.positions.data) for r in run[-1] for g in r.evicted) > 0 for run in runs)
            assert 4 in sizes, f"no engine call merged two RPCs on the columnar entry: {sizes}"
            for c in clients:
                await c.close()

    arun(body())


def test_a_step_batch_over_a_mebibyte_is_answered_like_the_engine() -> None:
    # A ~1.2 MiB StepBatch (8 sessions x 2,048 new tokens, fanout 8): more than gRPC's initial
    # HTTP/2 stream window, so the request crosses several flow-control updates on its way in.
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            ref = Reference()
            sims = [SimSession(f"big{i}", config={**SMALL, "budget": 1024, "fanout": 8}, seed=i, k_first=2048)
                    for i in range(8)]
            for sim in sims:
                await c.open_session(sim.session_id, sim.config)
                ref.open(sim)
            assert batch_request(sims, [s.make() for s in sims]).ByteSize() > 1024 * 1024
            await drive_batch(c, sims, 3, ref)
            await c.close()

    arun(body())
