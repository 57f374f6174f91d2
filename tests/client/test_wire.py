"""Round trips and error cases of the tensor wire format and the positions checksum."""

from __future__ import annotations

import random

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import WIRE_DTYPES, WireError, positions_checksum, tensor_from_proto, tensor_to_proto

_NP = {
    pb.D_TYPE_FLOAT16: np.float16,
    pb.D_TYPE_FLOAT32: np.float32,
    pb.D_TYPE_INT32: np.int32,
    pb.D_TYPE_INT64: np.int64,
    pb.D_TYPE_UINT8: np.uint8,
    pb.D_TYPE_BOOL: np.bool_,
}


def test_every_wire_dtype_is_covered() -> None:
    # A dtype added to the proto but not to the wire table would be undecodable.
    proto_values = {v.number for v in pb.DType.DESCRIPTOR.values} - {pb.D_TYPE_UNSPECIFIED}
    assert proto_values == set(WIRE_DTYPES) == set(_NP)


@st.composite
def _arrays(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    wire = draw(st.sampled_from(sorted(_NP)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    arr = draw(hnp.arrays(_NP[wire], shape))
    return wire, arr


@settings(max_examples=200, deadline=None)
@given(_arrays())
def test_round_trip_every_dtype(case: tuple[int, np.ndarray]) -> None:
    wire, arr = case
    t = torch.from_numpy(arr.copy())
    msg = tensor_to_proto(t)
    assert msg.dtype == wire
    assert list(msg.shape) == list(arr.shape)
    # The wire format is exactly the little-endian C-order bytes.
    assert msg.data == arr.astype(arr.dtype.newbyteorder("<")).tobytes(order="C")
    # Survives serialisation of the message itself.
    back = tensor_from_proto(pb.Tensor.FromString(msg.SerializeToString()), field="x")
    assert back.dtype == t.dtype
    assert back.shape == t.shape
    # Bitwise equality so NaN payloads and -0.0 are checked too.
    assert back.numpy().tobytes() == arr.tobytes()


def test_non_contiguous_tensor_is_sent_in_c_order() -> None:
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()
    back = tensor_from_proto(tensor_to_proto(t), field="x")
    assert torch.equal(back, t)


def test_dtype_conversion_on_encode() -> None:
    t = torch.tensor([[0.5, 0.25], [1.0, 0.0]], dtype=torch.float32)
    msg = tensor_to_proto(t, pb.D_TYPE_FLOAT16)
    assert msg.dtype == pb.D_TYPE_FLOAT16 and len(msg.data) == 8
    assert torch.equal(tensor_from_proto(msg, field="attn"), t.half())
    assert tensor_to_proto(t, torch.int64).dtype == pb.D_TYPE_INT64


def test_decoded_tensor_is_writable_and_owns_memory() -> None:
    msg = tensor_to_proto(torch.zeros(4, dtype=torch.float32))
    t = tensor_from_proto(msg, field="x")
    t += 1  # would fail (or corrupt the message) on a read-only view of the bytes
    assert torch.equal(t, torch.ones(4))


def test_unsupported_torch_dtype_names_field() -> None:
    with pytest.raises(WireError) as e:
        tensor_to_proto(torch.zeros(2, dtype=torch.float64), field="attn")
    assert e.value.field == "attn" and "float64" in e.value.reason


def test_unknown_wire_dtype_on_encode() -> None:
    with pytest.raises(WireError, match="unknown wire dtype"):
        tensor_to_proto(torch.zeros(2), 99, field="attn")


@pytest.mark.parametrize("dtype", [pb.D_TYPE_UNSPECIFIED, 42])
def test_unknown_dtype_on_decode_names_field(dtype: int) -> None:
    msg = pb.Tensor(dtype=dtype, shape=[2], data=b"\0" * 8)
    with pytest.raises(WireError) as e:
        tensor_from_proto(msg, field="steps[3].attn")
    assert e.value.field == "steps[3].attn"
    assert "dtype" in e.value.reason
    assert str(e.value).startswith("steps[3].attn: ")


@pytest.mark.parametrize("delta", [-1, 1, -8])
def test_length_mismatch_names_field_and_sizes(delta: int) -> None:
    good = tensor_to_proto(torch.zeros(2, 3, dtype=torch.float32))
    data = good.data[:delta] if delta < 0 else good.data + b"\0" * delta
    msg = pb.Tensor(dtype=good.dtype, shape=good.shape, data=data)
    with pytest.raises(WireError) as e:
        tensor_from_proto(msg, field="last")
    assert e.value.field == "last"
    assert f"{len(data)} bytes" in e.value.reason and "needs 24" in e.value.reason


def test_negative_dimension_rejected() -> None:
    msg = pb.Tensor(dtype=pb.D_TYPE_INT32, shape=[-1, 2], data=b"")
    with pytest.raises(WireError, match="negative dimension"):
        tensor_from_proto(msg, field="edge_index")


def test_huge_shape_rejected_before_allocation() -> None:
    msg = pb.Tensor(dtype=pb.D_TYPE_FLOAT32, shape=[1 << 30, 1 << 30], data=b"")
    with pytest.raises(WireError, match="elements"):
        tensor_from_proto(msg, field="attn")


def test_bool_bytes_other_than_0_1_rejected() -> None:
    msg = pb.Tensor(dtype=pb.D_TYPE_BOOL, shape=[3], data=b"\x00\x01\x02")
    with pytest.raises(WireError, match="0 or 1"):
        tensor_from_proto(msg, field="keep")


def test_empty_tensor_round_trip() -> None:
    t = torch.zeros(2, 0, 4, dtype=torch.int32)
    msg = tensor_to_proto(t)
    assert msg.data == b""
    assert tensor_from_proto(msg, field="x").shape == (2, 0, 4)


# --- positions_checksum -------------------------------------------------------------------

_M = (1 << 64) - 1


def _mix_ref(p: int) -> int:
    """Pure-Python reference of the per-position mix (splitmix64 finalizer of p + golden ratio)."""
    z = ((p & _M) + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def _checksum_ref(positions: list[int]) -> int:
    return sum(_mix_ref(p) for p in positions) & _M


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**62 - 1), max_size=200))
def test_checksum_matches_reference_and_ignores_order(positions: list[int]) -> None:
    expected = _checksum_ref(positions)
    assert positions_checksum(torch.tensor(positions, dtype=torch.int64)) == expected
    shuffled = positions[:]
    random.Random(0).shuffle(shuffled)
    assert positions_checksum(torch.tensor(shuffled, dtype=torch.int64)) == expected
    assert 0 <= expected < 2**64


def test_checksum_known_values() -> None:
    # Pinned so a worker in another language can check its implementation.
    assert positions_checksum(torch.tensor([], dtype=torch.int64)) == 0
    assert positions_checksum(torch.tensor([0])) == _mix_ref(0) == 0xE220A8397B1DCDAF
    assert positions_checksum(torch.tensor([1, 4])) == (_mix_ref(1) + _mix_ref(4)) & _M
    assert positions_checksum(torch.tensor([0], dtype=torch.int32)) == positions_checksum(torch.tensor([0]))


def test_checksum_tells_positions_2_32_apart() -> None:
    # The old 32-bit sum worked mod 2^32: 19 and 2^32 + 19 had the same term, so a position wrapped
    # as int32 on the wire went unnoticed. The 64-bit digest tells them (and int64 max) apart.
    for p in (19, 2**31 + 11, 2**62 - 1):
        assert positions_checksum(torch.tensor([p])) != positions_checksum(torch.tensor([p + 2**32]))
    assert positions_checksum(torch.tensor([2**63 - 1])) != positions_checksum(torch.tensor([-1]))


def test_checksum_detects_same_count_and_sum() -> None:
    # A linear per-element hash would collide here (same count, same sum of positions).
    assert positions_checksum(torch.tensor([1, 4])) != positions_checksum(torch.tensor([2, 3]))


def test_checksum_large_set_and_2d_input() -> None:
    pos = torch.arange(0, 1_000_000, 3, dtype=torch.int64)
    assert positions_checksum(pos) == _checksum_ref(pos.tolist())
    assert positions_checksum(pos[:12].reshape(3, 4)) == _checksum_ref(pos[:12].tolist())


def test_checksum_rejects_float_positions() -> None:
    with pytest.raises(WireError, match="integers"):
        positions_checksum(torch.tensor([1.0, 2.0]))


def test_checksum_small_and_vector_paths_agree() -> None:
    """The plain-int path (small sets) and the numpy path give the same checksum."""
    from nexus_client import wire

    pos = torch.randint(0, 2**40, (200,), generator=torch.Generator().manual_seed(3))
    whole = wire.positions_checksum(pos)
    by_parts = sum(wire.positions_checksum(pos[i : i + 8]) for i in range(0, 200, 8)) & _M
    assert whole == by_parts
    assert wire.positions_checksum(pos[:5]) == (sum(wire._mix64(int(p)) for p in pos[:5]) & _M)
