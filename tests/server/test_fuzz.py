"""Fuzz every RPC of a live ``nexus-sidecar serve`` process with hypothesis (>= 1,000 cases):
raw garbage bytes, invalid UTF-8, random configs, random tensors (dtypes, shapes vs byte
lengths, NaN/Inf, huge dims, positions), mutated steps, random ids. Throughout, one healthy
session steps and its answers must equal the in-process engine's.

The bar: no UNKNOWN / INTERNAL / DATA_LOSS for anything sent, the server never dies, no traceback
in its log, and 0 differences on the healthy session.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nexus_client.client import ClientOptions, NexusClient
from nexus_client.errors import SidecarError
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import tensor_to_proto
from nexus_sidecar.bench.procs import SidecarProc, sidecar_process

from tests.server.conftest import Reference, SimSession, assert_same_answer

pytestmark = pytest.mark.timeout(600)
CASES = 1000
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
METHODS = {"OpenSession": pb.OpenSessionRequest, "Step": pb.StepRequest, "CloseSession": pb.CloseSessionRequest,
           "GetSession": pb.GetSessionRequest, "ListPolicies": pb.ListPoliciesRequest, "Resync": pb.ResyncRequest}


@dataclass
class World:
    """The live server, the healthy session and its reference, and what the fuzz saw."""

    proc: SidecarProc
    log: Path
    client: NexusClient
    channel: grpc.Channel
    healthy: SimSession
    ref: Reference
    fz: SimSession
    codes: collections.Counter[str] = field(default_factory=collections.Counter)
    healthy_steps: int = 0
    cases: int = 0


@pytest.fixture(scope="module", params=["memory", "redis"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # Both stores: with Redis every Step also goes through the owner-epoch check (server/ownership.py).
    log = tmp_path_factory.mktemp("fuzz") / "sidecar.log"
    store = "memory"
    if request.param == "redis":
        rp = request.getfixturevalue("_redis_session")
        with rp.client() as r:
            r.flushall()
        store = rp.url
    with sidecar_process("--device", "cpu", "--max-delay-us", "100", "--store", store, log_path=log) as proc:
        c = NexusClient(ClientOptions(proc.target, timeout_s=20, retries=0))
        healthy, fz = SimSession("healthy", seed=3), SimSession("fz", seed=4)
        ref = Reference()
        for s in (healthy, fz):
            c.open_session(s.session_id, s.config)
        ref.open(healthy)
        channel = grpc.insecure_channel(proc.target)
        w = World(proc, log, c, channel, healthy, ref, fz)
        yield w
        channel.close()
        c.close()
        assert proc.proc.poll() is None, "the sidecar died during the fuzz run"
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


# -- strategies --------------------------------------------------------------------------------
ids = st.one_of(st.text(max_size=40), st.text(min_size=120, max_size=300),
                st.sampled_from(["fz", "ghost", "", " ", "{x}", "a:b", "a" * 129, "é" * 10])
                ).filter(lambda s: s != "healthy")
dtypes = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99])
dims = st.one_of(st.integers(-2, 24), st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1, -(2**62)]))
raw_tensor = st.builds(lambda d, s, b: pb.Tensor(dtype=d, shape=s, data=b), dtypes, st.lists(dims, max_size=4),
                       st.binary(max_size=300))
special = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e30, -1e-30, 65504.0])
positions = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-1, 0, 2**31, 2**32 + 19, 2**62 - 1, 2**62]))


@st.composite
def consistent_tensor(draw: st.DrawFn) -> pb.Tensor:
    """A tensor whose byte length matches its shape, with arbitrary (also special) values."""
    shape = draw(st.lists(st.integers(0, 6), max_size=3))
    n = math.prod(shape)
    kind = draw(st.sampled_from(["f32", "f16", "i32", "i64", "bool"]))
    if kind in ("f32", "f16"):
        vals = draw(st.lists(st.one_of(st.floats(width=16 if kind == "f16" else 32), special), min_size=n, max_size=n))
        t = torch.tensor(vals, dtype=torch.float32).reshape(shape).to(torch.float16 if kind == "f16" else torch.float32)
    elif kind == "bool":
        t = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    else:
        lo, hi = (-(2**31), 2**31 - 1) if kind == "i32" else (-(2**63), 2**63 - 1)
        vals = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
        t = torch.tensor(vals, dtype=torch.int32 if kind == "i32" else torch.int64).reshape(shape)
    return tensor_to_proto(t)


tensors = st.one_of(raw_tensor, consistent_tensor())
TENSOR_FIELDS = ("new_positions", "attn", "last", "edge_index", "edge_weight")


@st.composite
def configs(draw: st.DrawFn) -> pb.PolicyConfig:
    msg = pb.PolicyConfig(policy=draw(st.one_of(st.sampled_from(["", "nexus", "tova", "h2o", "streaming", "snapkv",
                                                                   "random", "nexus_topk", "nope"]),
                                                  st.text(max_size=80))))
    u32 = st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1))
    for name in ("budget", "slack", "sinks", "recent", "iterations", "pool", "block_size"):
        if draw(st.booleans()):
            setattr(msg, name, draw(u32))
    if draw(st.booleans()):
        # Beyond 8 only what admission must refuse (max_groups 128, the engine's 1024) or reject.
        msg.groups = draw(st.one_of(st.integers(0, 8), st.integers(129, 2**32 - 1)))
    if draw(st.booleans()):
        msg.fanout = draw(st.one_of(st.integers(0, 16), st.integers(65, 2**32 - 1)))
    for name in ("beta", "gamma", "tau"):
        if draw(st.booleans()):
            setattr(msg, name, draw(st.one_of(st.floats(), special)))
    if draw(st.booleans()):
        msg.seed = draw(st.integers(0, 2**64 - 1))
    for name in ("randomness", "granularity", "attn_reduce", "pool_reduce"):
        if draw(st.booleans()):
            setattr(msg, name, draw(st.integers(0, 5)))
    return msg


mutations = st.lists(st.one_of(
    st.tuples(st.just("tensor"), st.sampled_from(TENSOR_FIELDS), tensors),
    st.tuples(st.just("value"), st.sampled_from(("attn", "last", "edge_weight")), st.tuples(st.integers(0, 10**6),
                                                                                           special)),
    st.tuples(st.just("position"), st.sampled_from(("new_positions", "edge_index")),
              st.tuples(st.integers(0, 10**6), positions)),
    st.tuples(st.just("step"), st.none(), st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1))),
    st.tuples(st.just("count"), st.none(), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("checksum"), st.none(), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("clear"), st.sampled_from(TENSOR_FIELDS), st.none()),
    st.tuples(st.just("id"), st.none(), ids),
), max_size=2)


def mutate(sim: SimSession, plan: list[tuple[str, Any, Any]]) -> pb.SessionStep:
    """The session's next valid step with the planned things broken (plain Python: the plan is
    drawn independently of the session's state, so hypothesis replays stay consistent)."""
    msg = pb.SessionStep()
    msg.CopyFrom(sim.make().msg)
    for what, name, value in plan:
        if what == "tensor":
            getattr(msg, name).CopyFrom(value)
        elif what == "value":
            t = getattr(msg, name)
            if t.dtype == pb.D_TYPE_FLOAT32 and len(t.data) >= 4:
                arr = bytearray(t.data)
                i = value[0] % (len(arr) // 4)
                arr[4 * i : 4 * i + 4] = torch.tensor([value[1]], dtype=torch.float32).numpy().tobytes()
                t.data = bytes(arr)
        elif what == "position":
            t = getattr(msg, name)
            n = math.prod(t.shape)
            width = 4 if t.dtype == pb.D_TYPE_INT32 else 8
            # Only a well-formed integer tensor gets a value changed (an earlier step of the plan may
            # have replaced it by one whose data does not match its shape: that case is already bad).
            if n and t.dtype in (pb.D_TYPE_INT32, pb.D_TYPE_INT64) and len(t.data) == n * width:
                vals = torch.frombuffer(bytearray(t.data), dtype=torch.int32 if t.dtype == pb.D_TYPE_INT32
                                        else torch.int64).to(torch.int64).clone()
                vals[value[0] % n] = value[1]
                t.CopyFrom(tensor_to_proto(vals.reshape(list(t.shape))))
        elif what == "step":
            msg.step = value
        elif what == "count":
            msg.retained_count = value
        elif what == "checksum":
            msg.retained_checksum = value
        elif what == "clear":
            msg.ClearField(name)
        else:
            msg.session_id = value
    return msg


def invalid_utf8_request(method: str, payload: bytes) -> bytes:
    """Field 1 (a string in every request with fields) holding bytes that are not UTF-8."""
    junk = b"\xff" + payload[:20] + b"\xc3"
    return b"\x0a" + bytes([len(junk)]) + junk


cases = st.one_of(
    st.tuples(st.just("garbage"), st.sampled_from(sorted(METHODS)), st.binary(max_size=400)),
    st.tuples(st.just("utf8"), st.sampled_from(["OpenSession", "CloseSession", "GetSession", "Resync"]),
              st.binary(max_size=20)),
    st.tuples(st.just("resync"), st.tuples(ids, st.one_of(st.none(), configs())),
              st.tuples(st.integers(0, 2**64 - 1), st.lists(tensors, max_size=3))),
    st.tuples(st.just("truncated"), st.sampled_from(["OpenSession", "Step"]), st.integers(1, 200)),
    st.tuples(st.just("open"), ids, configs()),
    st.tuples(st.just("step"), mutations, st.lists(mutations, max_size=2)),
    st.tuples(st.just("random_step"), st.lists(st.tuples(ids, st.integers(0, 2**64 - 1), st.lists(tensors, min_size=5,
                                                                                               max_size=5)),
                                                max_size=3), st.none()),
    st.tuples(st.just("get"), ids, st.booleans()),
    st.tuples(st.just("close"), ids.filter(lambda s: s != "fz"), st.none()),
    st.tuples(st.just("list"), st.none(), st.none()),
)


def _raw(w: World, method: str, data: bytes) -> grpc.StatusCode:
    try:
        w.channel.unary_unary(f"/nexus.v1.EvictionService/{method}")(data, timeout=20)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _rpc(w: World, fn: Any, *args: Any) -> tuple[grpc.StatusCode, Any]:
    try:
        return grpc.StatusCode.OK, fn(*args)
    except SidecarError as exc:
        return exc.code, exc.details


def _step_healthy(w: World) -> None:
    p = w.healthy.make()
    r = w.client.step([p.msg])[0]  # any error here fails the test: the healthy session must not notice
    assert_same_answer(r, w.ref.step(w.healthy, p), f"healthy step {p.msg.step}")
    w.healthy.apply(p, r)
    w.healthy_steps += 1


@settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=cases)
def test_fuzz_every_rpc(world: World, case: tuple[str, Any, Any]) -> None:
    w, (kind, a, b) = world, case
    w.cases += 1
    if kind == "garbage":
        code = _raw(w, a, b)
    elif kind == "utf8":
        code = _raw(w, a, invalid_utf8_request(a, b))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (a, code)
    elif kind == "truncated":
        full = (pb.OpenSessionRequest(session_id="t", config=pb.PolicyConfig(policy="nexus", budget=99))
                if a == "OpenSession" else pb.StepRequest(steps=[w.fz.make().msg])).SerializeToString()
        code = _raw(w, a, full[: min(b, len(full) - 1)])
    elif kind == "open":
        code, _ = _rpc(w, w.client._call, w.client._stub.OpenSession, pb.OpenSessionRequest(session_id=a, config=b))
    elif kind == "step":
        msgs = [mutate(w.fz, a)] + [mutate(SimSession(f"x{i}"), plan) for i, plan in enumerate(b)]
        code, res = _rpc(w, w.client.step, msgs)
        if code == grpc.StatusCode.OK:  # a harmless mutation (or none): the fz worker follows the answer
            mine = [r for r in res if r.session_id == "fz"]
            if mine and mine[0].step == w.fz.ws.step + 1:
                w.fz.apply(w.fz.make(), mine[0])
    elif kind == "random_step":
        steps = [pb.SessionStep(session_id=sid, step=n, new_positions=t[0], attn=t[1], last=t[2], edge_index=t[3],
                                edge_weight=t[4]) for sid, n, t in a]
        code, _ = _rpc(w, w.client.step, steps)
    elif kind == "resync":
        req = pb.ResyncRequest(session_id=a[0], step=b[0], retained=b[1])
        if a[1] is not None:
            req.config.CopyFrom(a[1])
        code, _ = _rpc(w, w.client._call, w.client._stub.Resync, req)
    elif kind == "get":
        code, _ = _rpc(w, w.client.get_session, a, b)
    elif kind == "close":
        code, _ = _rpc(w, w.client.close_session, a)
    else:
        code, _ = _rpc(w, w.client.list_policies)
    w.codes[code.name] += 1
    assert code not in FORBIDDEN, (kind, a, b, code)
    if w.cases % 7 == 0:
        _step_healthy(w)


def test_fuzz_summary(world: World) -> None:
    """Runs after the fuzz (file order): enough cases ran, the healthy session is intact."""
    assert world.cases >= CASES, world.cases
    _step_healthy(world)
    snap = world.client.get_session("healthy")
    assert snap.step == world.healthy.ws.step and snap.retained_checksum == world.healthy.ws.retained_checksum
    assert not (set(world.codes) & {c.name for c in FORBIDDEN})
    print(f"fuzz: {world.cases} cases, codes {dict(world.codes)}, healthy steps {world.healthy_steps}")
