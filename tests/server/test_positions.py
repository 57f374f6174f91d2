"""Exact int64 positions end to end: above 2^31 and up to 2^62 - 1, evicted lists, GetSession
positions and the 64-bit checksum agree with the in-process engine; positions outside [0, 2^62)
are INVALID_ARGUMENT naming the proto field."""

from __future__ import annotations

import grpc
import pytest
import torch
from nexus_client.packing import checksum_of, unpack_result
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import tensor_from_proto, tensor_to_proto

from tests.server.conftest import SMALL, Reference, SimSession, arun, client, drive, expect_error, running_sidecar

IA = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("start", [2**31 - 5, 2**32 + 7, 2**62 - 200])
def test_large_positions_are_exact_on_every_answer(start: int) -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            sim = SimSession("big", config={**SMALL, "groups": 2})
            sim.next_pos = start
            ref = Reference()
            await c.open_session("big", sim.config)
            ref.open(sim)
            history = await drive(c, [sim], 12, ref)  # keep masks and evicted lists == the engine's
            evicted = [p for res in history for r in res for e in unpack_result(r)[1] for p in e.tolist()]
            assert evicted and min(evicted) >= start, "evictions must report the true (large) positions"
            for res in history:
                for g in res[0].evicted:
                    assert g.positions.dtype == pb.D_TYPE_INT64
            snap = await c.get_session("big")
            got = [tensor_from_proto(g.positions, field="positions") for g in snap.groups]
            assert [p.tolist() for p in got] == [r.tolist() for r in sim.retained]
            assert min(int(p.min()) for p in got) >= start
            want = checksum_of(sim.retained)
            assert snap.retained_checksum == want == sim.ws.retained_checksum
            await c.close()

    arun(body())


def test_checksum_of_wrapped_positions_differs() -> None:
    # The failure the old 32-bit checksum hid: a set and its int32-wrapped copy must disagree.
    true = [torch.tensor([2**31 + 11, 2**32 + 19], dtype=torch.int64)]
    wrapped = [true[0].to(torch.int32).to(torch.int64)]
    assert wrapped[0].tolist() != true[0].tolist() and checksum_of(true) != checksum_of(wrapped)


@pytest.mark.parametrize(("field", "value"), [
    ("new_positions", 2**62), ("new_positions", -1), ("new_positions", 2**63 - 1),
    ("edge_index", 2**62), ("edge_index", -2),
])
def test_positions_outside_the_range_are_invalid_argument(field: str, value: int) -> None:
    async def body() -> None:
        async with running_sidecar() as sc:
            c = client(sc)
            sim = SimSession("s1")
            await c.open_session("s1", sim.config)
            planned = sim.make()
            bad = pb.SessionStep()
            bad.CopyFrom(planned.msg)
            if field == "new_positions":
                pos = planned.new.clone()
                pos[0] = value
                bad.new_positions.CopyFrom(tensor_to_proto(pos.to(torch.int64)))
            else:
                e = planned.inp.edge_pos.clone()
                e[0, 0, 0] = value
                bad.edge_index.CopyFrom(tensor_to_proto(e.to(torch.int64)))
            msg = await expect_error(c.step([bad]), IA)
            assert msg.startswith(f"steps[s1].{field}: ") and "2^62" in msg, msg
            # Nothing was applied: the good payload is still step 1.
            res = await c.step([planned.msg])
            assert res[0].step == 1
            await c.close()

    arun(body())


def test_a_v1_checkpoint_reads_with_its_checksum_recomputed() -> None:
    # Rolling upgrade: a v1 envelope carries the old 32-bit checksum; it is recomputed as the 64-bit
    # digest of the state's positions, so a worker on the new client continues without a mismatch.
    import struct

    from nexus_sidecar.engine import Engine
    from nexus_sidecar.server.checkpoint import Checkpoint

    eng = Engine(torch.device("cpu"))
    sim = SimSession("v1")
    h = eng.open(sim.cfg)
    for _ in range(6):
        p = sim.make()
        out = eng.step({h: p.inp})[h]
        keep = out.keep
        for gi in range(sim.cfg.groups):
            slots = torch.cat([sim.retained[gi], p.new])
            sim.retained[gi] = slots[keep[gi, : slots.numel()]]
        sim.next_pos = int(p.new[-1]) + 1
    state = eng.snapshot(h)
    v2 = Checkpoint(6, checksum_of(sim.retained), b"d" * 32, b"", state).to_bytes()
    body = v2[struct.calcsize("<4sHHQQH"):]
    v1 = struct.pack("<4sHHQIH", b"NXCP", 1, 0, 6, 0xDEADBEEF, 32) + body
    cp = Checkpoint.from_bytes(v1)
    assert cp.step == 6 and cp.checksum == checksum_of(sim.retained) and cp.state.equals(state)
    assert Checkpoint.from_bytes(v2).checksum == cp.checksum
