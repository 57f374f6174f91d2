"""The columnar batch layout on the worker side: BatchBuilder packs what StepBatchRequest says,
read_answer reads a StepBatchResponse back and refuses one that does not fit its request."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nexus_client.columnar import BatchBuilder, read_answer
from nexus_client.packing import WorkerSession
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import WireError, tensor_from_proto


def _session(sid: str, groups: int, n: int, k: int, fanout: int, base: int) -> tuple[WorkerSession, dict]:
    ws = WorkerSession(sid, groups=groups, step=4, retained_count=groups * n, retained_checksum=(1 << 64) - 5)
    g = torch.Generator().manual_seed(base)
    tensors = {
        "new_positions": torch.arange(base, base + k),
        "attn": torch.rand(groups, n + k, generator=g),
        "last": torch.rand(groups, n + k, generator=g),
        "edge_pos": torch.full((groups, k, fanout), base, dtype=torch.int64),
        "edge_w": torch.rand(groups, k, fanout, generator=g),
    }
    return ws, tensors


def test_builder_packs_the_documented_layout() -> None:
    a, ta = _session("a", 2, 5, 3, 4, 100)
    b, tb = _session("b", 1, 7, 1, 6, 2**40)  # a position beyond int32: the buffer goes int64
    builder = BatchBuilder(torch.float16)
    builder.add(a, **ta)
    builder.add(b, **tb, step=9)
    req = builder.request()
    assert list(req.session_ids) == ["a", "b"] and builder.session_ids == ["a", "b"]
    assert np.frombuffer(req.steps, "<u8").tolist() == [5, 9]
    assert np.frombuffer(req.retained_counts, "<u4").tolist() == [10, 7]
    assert np.frombuffer(req.retained_checksums, "<u8").tolist() == [(1 << 64) - 5] * 2
    assert np.frombuffer(req.retained_slots, "<u4").tolist() == [5, 7]
    assert np.frombuffer(req.token_offsets, "<i8").tolist() == [0, 3, 4]
    assert np.frombuffer(req.slot_offsets, "<i8").tolist() == [0, 16, 24]
    assert np.frombuffer(req.edge_offsets, "<i8").tolist() == [0, 24, 30]
    assert req.new_positions.dtype == pb.D_TYPE_INT64 and req.attn.dtype == pb.D_TYPE_FLOAT16
    pos = tensor_from_proto(req.new_positions, field="p")
    assert pos.tolist() == [100, 101, 102, 2**40]
    attn = tensor_from_proto(req.attn, field="a", as_dtype=torch.float32)
    assert torch.equal(attn[:16].view(2, 8), ta["attn"].half().float())
    assert not req.HasField("key_norm")


def test_builder_refuses_mixed_priors() -> None:
    a, ta = _session("a", 1, 3, 1, 2, 0)
    b, tb = _session("b", 1, 3, 1, 2, 10)
    builder = BatchBuilder()
    builder.add(a, **ta, key_norm=torch.ones(1, 4))
    with pytest.raises(WireError, match="same priors"):
        builder.add(b, **tb)


def _answer(req: pb.StepBatchRequest, keep: np.ndarray, evicted: list[list[int]]) -> pb.StepBatchResponse:
    counts = [len(e) for e in evicted]
    return pb.StepBatchResponse(
        steps=np.array([5, 9], "<u8").tobytes(), retained_counts=np.array([7, 6], "<u4").tobytes(),
        retained_checksums=np.array([1, (1 << 64) - 1], "<u8").tobytes(),
        keep=np.packbits(keep, bitorder="little").tobytes(),
        evicted=np.array([p for e in evicted for p in e], "<i8").tobytes(),
        evicted_offsets=np.concatenate([[0], np.cumsum(counts)]).astype("<i8").tobytes())


def test_read_answer_splits_per_session_and_refuses_what_does_not_fit() -> None:
    a, ta = _session("a", 2, 5, 3, 4, 100)
    b, tb = _session("b", 1, 7, 1, 6, 200)
    builder = BatchBuilder()
    builder.add(a, **ta)
    builder.add(b, **tb)
    req = builder.request()
    keep = np.zeros(24, dtype=bool)
    keep[[0, 3, 9, 15, 16, 23]] = True
    resp = _answer(req, keep, [[7, 8], [1], [3, 4, 5]])  # rows: (a, g0), (a, g1), (b, g0)
    answer = read_answer(resp, req, [2, 1])
    assert len(answer) == 2 and answer.steps.tolist() == [5, 9]
    assert answer.keep_of(0).shape == (2, 8) and answer.keep_of(1).shape == (1, 8)
    assert torch.equal(answer.keep_of(0).reshape(-1), torch.from_numpy(keep[:16]))
    assert [e.tolist() for e in answer.evicted_of(0)] == [[7, 8], [1]]
    assert [e.tolist() for e in answer.evicted_of(1)] == [[3, 4, 5]]
    r = answer.session_result(1, "b")
    assert r.retained_checksum == (1 << 64) - 1 and r.retained_count == 6 and list(r.keep.shape) == [1, 8]
    answer.settle(b, 1)
    assert (b.step, b.retained_count, b.retained_checksum) == (9, 6, (1 << 64) - 1)

    short = pb.StepBatchResponse()
    short.CopyFrom(resp)
    short.keep = short.keep[:-1]
    with pytest.raises(WireError, match="keep"):
        read_answer(short, req, [2, 1])
    bad = pb.StepBatchResponse()
    bad.CopyFrom(resp)
    bad.evicted_offsets = np.array([0, 3, 2, 6], "<i8").tobytes()
    with pytest.raises(WireError, match="evicted_offsets"):
        read_answer(bad, req, [2, 1])
    with pytest.raises(WireError, match="evicted_offsets"):
        read_answer(resp, req, [1, 1])  # the rows do not match the sessions' groups
