"""The rest of the status-code contract: bytes that are not a message, invalid UTF-8, unbounded
input never echoed, shape errors on ``steps[<id>].<proto field>``, rejected steps counted by
code, and no traceback in the log for anything a client sent."""

from __future__ import annotations

import logging

import grpc
import pytest
import torch
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import tensor_to_proto
from nexus_sidecar.server.errors import MAX_MESSAGE, brief, to_status

from tests.server.conftest import (
    SMALL,
    SimSession,
    arun,
    client,
    drive,
    expect_error,
    http,
    running_sidecar,
    sample_value,
    target,
)

IA = grpc.StatusCode.INVALID_ARGUMENT
METHODS = ("OpenSession", "Step", "CloseSession", "GetSession", "ListPolicies")
# Field 1 (session_id / steps), wire type 2, length 3: bytes that are not UTF-8.
BAD_UTF8_ID = b"\x0a\x03\xff\xfe\xfd"


async def _raw(tgt: str, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(tgt) as ch:
        call = ch.unary_unary(f"/nexus.v1.EvictionService/{method}")
        try:
            await call(data, timeout=10)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
        return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", METHODS)
def test_garbage_bytes_and_invalid_utf8_are_invalid_argument_without_traceback(
        method: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def body() -> None:
        async with running_sidecar() as sc:
            for data in (b"\xff\xff\xff\xff garbage", b"\x0a\xff\xff\xff\xff\x0f", BAD_UTF8_ID):
                if method == "ListPolicies" and data == BAD_UTF8_ID:
                    continue  # ListPoliciesRequest has no field 1: unknown fields are fine there
                code, details = await _raw(target(sc), method, data)
                assert code == IA, (method, data, code, details)
                assert details.startswith("request: ") and "not a valid nexus.v1." in details, details
            # The server is fine afterwards.
            assert (await client(sc).list_policies())

    arun(body())
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


def test_unbounded_input_is_never_echoed() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            msg = await expect_error(c.open_session("p", {"policy": "x" * 10_000}), IA)
            assert msg.startswith("config.policy: ") and len(msg) < 200 and "10000 characters" in msg, msg
            msg = await expect_error(c.open_session("y" * 10_000, SMALL), IA)
            assert "session_id" in msg and len(msg) < 200, msg
            msg = await expect_error(c.get_session("z" * 10_000), IA)
            assert len(msg) < 200, msg
            # Many steps with one duplicate of a long (but valid) id: still bounded.
            sim = SimSession("a" * 128)
            await c.open_session(sim.session_id, sim.config)
            p = sim.make()
            msg = await expect_error(c.step([p.msg, p.msg]), IA)
            assert "more than once" in msg and len(msg) < 400, msg
            await c.close()

    arun(body())


def test_to_status_cuts_any_message() -> None:
    code, msg = to_status(RuntimeError("q" * 100_000))
    assert code == grpc.StatusCode.INTERNAL and len(msg) <= MAX_MESSAGE
    assert brief("w" * 500).endswith("(500 characters)") and len(brief("w" * 500)) < 100
    assert brief("short") == "'short'"


def test_shape_errors_carry_the_step_prefix_and_the_proto_field_names() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            sim = SimSession("s1", config={**SMALL, "groups": 2})
            await c.open_session("s1", sim.config)
            await drive(c, [sim], 2)
            F = sim.cfg.fanout

            bad = sim.make()
            bad.msg.edge_index.CopyFrom(tensor_to_proto(torch.full((2, 3, F + 1), -1, dtype=torch.int32)))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert msg.startswith("steps[s1].edge_index: ") and "edge_pos" not in msg, msg

            bad = sim.make()
            bad.msg.edge_weight.CopyFrom(tensor_to_proto(torch.zeros(1, 3, F)))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert msg.startswith("steps[s1].edge_weight: ") and "edge_w " not in msg, msg

            bad = sim.make()
            bad.msg.attn.CopyFrom(tensor_to_proto(torch.zeros(2, 1)))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert msg.startswith("steps[s1].attn: "), msg

            # Found on the device (an edge to a position that is not in the cache): same naming.
            bad = sim.make()
            e = bad.inp.edge_pos.clone()
            e[0, 0, 0] = 10_000
            bad.msg.edge_index.CopyFrom(tensor_to_proto(e.to(torch.int32)))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert msg.startswith("steps[s1].edge_index: ") and "outside the cache" in msg, msg

            bad = sim.make()
            w = bad.inp.edge_w.clone()
            w[1, 0, 0] = -1.0
            bad.msg.edge_weight.CopyFrom(tensor_to_proto(w))
            msg = await expect_error(c.step([bad.msg]), IA)
            assert msg.startswith("steps[s1].edge_weight: "), msg
            await drive(c, [sim], 1)  # nothing was applied
            await c.close()

    arun(body())


def test_rejected_steps_are_counted_by_code() -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            sim = SimSession("s1")
            await c.open_session("s1", sim.config)
            await drive(c, [sim], 2)
            await expect_error(c.step([sim.make(step=9).msg]), grpc.StatusCode.FAILED_PRECONDITION)
            ghost = SimSession("ghost")
            await expect_error(c.step([ghost.make().msg]), grpc.StatusCode.NOT_FOUND)
            other = SimSession("other")
            await c.open_session("other", other.config)
            bad = sim.make()
            bad.msg.attn.data = b"\x00"
            await expect_error(c.step([bad.msg, other.make().msg]), IA)
            await expect_error(c.step([]), IA)
            code, _ = await _raw(target(sc), "Step", b"\xff\xff")
            assert code == IA
            text = (await http(sc).get("/metrics")).text
            assert sample_value(text, "nexus_steps_rejected_total", code="FAILED_PRECONDITION") == 1
            assert sample_value(text, "nexus_steps_rejected_total", code="NOT_FOUND") == 1
            assert sample_value(text, "nexus_steps_rejected_total", code="INVALID_ARGUMENT") == 2 + 1 + 1
            await c.close()

    arun(body())


def test_a_valid_message_with_unknown_fields_is_accepted() -> None:
    # Forward compatibility: a newer client's extra fields are skipped, not a parse error.
    async def body() -> None:
        async with running_sidecar() as sc:
            data = pb.ListPoliciesRequest().SerializeToString() + b"\xa0\x06\x01"  # field 100 varint 1
            code, _ = await _raw(target(sc), "ListPolicies", data)
            assert code == grpc.StatusCode.OK

    arun(body())
