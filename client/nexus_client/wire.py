"""Packing helpers between torch tensors and the ``nexus.v1.Tensor`` wire message.

Tensors travel as packed little-endian bytes in C order with an explicit dtype and shape
(never as repeated scalars). Decoding validates the byte length against the shape before any
reinterpretation, so a truncated or mislabelled payload is an error that names the field,
never a silently wrong tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nexus_client.v1 import sidecar_pb2 as pb

__all__ = [
    "ATTN_REDUCE",
    "BUDGET_ALLOC",
    "CALL_KIND",
    "ENUM_FIELDS",
    "GRANULARITY",
    "POOL_REDUCE",
    "POSITION_LIMIT",
    "PRIOR",
    "PRIORS",
    "RANDOMNESS",
    "WIRE_DTYPES",
    "WireError",
    "int_wire_dtype",
    "mix64",
    "positions_checksum",
    "tensor_from_proto",
    "tensor_to_proto",
    "wire_array",
]

# Wire dtype -> (torch dtype, little-endian numpy dtype). Explicit "<" so decoding is correct
# on a big-endian host too.
WIRE_DTYPES: dict[int, tuple[torch.dtype, np.dtype]] = {
    pb.D_TYPE_FLOAT16: (torch.float16, np.dtype("<f2")),
    pb.D_TYPE_FLOAT32: (torch.float32, np.dtype("<f4")),
    pb.D_TYPE_INT32: (torch.int32, np.dtype("<i4")),
    pb.D_TYPE_INT64: (torch.int64, np.dtype("<i8")),
    pb.D_TYPE_UINT8: (torch.uint8, np.dtype("u1")),
    pb.D_TYPE_BOOL: (torch.bool, np.dtype("?")),
}
_TORCH_TO_WIRE: dict[torch.dtype, int] = {t: w for w, (t, _) in WIRE_DTYPES.items()}

# PolicyConfig enum names (as the engine spells them) <-> wire enum values; shared by the client
# (building requests) and the server (reading them).
RANDOMNESS: dict[str, int] = {"fixed": pb.RANDOMNESS_FIXED, "per_call": pb.RANDOMNESS_PER_CALL}
GRANULARITY: dict[str, int] = {"token": pb.GRANULARITY_TOKEN, "block": pb.GRANULARITY_BLOCK}
ATTN_REDUCE: dict[str, int] = {"sum": pb.ATTN_REDUCE_SUM, "mean": pb.ATTN_REDUCE_MEAN}
POOL_REDUCE: dict[str, int] = {"max": pb.POOL_REDUCE_MAX, "mean": pb.POOL_REDUCE_MEAN}
PRIOR: dict[str, int] = {"key_diversity": pb.PRIOR_KEY_DIVERSITY, "key_norm": pb.PRIOR_KEY_NORM,
                         "value_norm": pb.PRIOR_VALUE_NORM}
REACT_CALLS: dict[str, int] = {"all": pb.REACT_CALLS_ALL, "question": pb.REACT_CALLS_QUESTION}
BUDGET_ALLOC: dict[str, int] = {"fixed": pb.BUDGET_ALLOC_FIXED, "shared": pb.BUDGET_ALLOC_SHARED}
# What a step's queries are (SessionStep.call; the engine's StepInput.call).
CALL_KIND: dict[str, int] = {"unspecified": pb.CALL_KIND_UNSPECIFIED, "context": pb.CALL_KIND_CONTEXT,
                             "question": pb.CALL_KIND_QUESTION, "decode": pb.CALL_KIND_DECODE}
# The optional per-slot prior tensors of a step: StepInput fields, SessionStep fields, the keys of
# nexus_client.hf.priors.cache_priors and the names the `prior` knob takes, all spelled alike.
PRIORS: tuple[str, ...] = tuple(PRIOR)
# Every enum-valued PolicyConfig field and its map: a new enum knob is one line here, not a branch in
# the client's request builder and two in the server's codec.
ENUM_FIELDS: dict[str, dict[str, int]] = {
    "randomness": RANDOMNESS, "granularity": GRANULARITY, "attn_reduce": ATTN_REDUCE, "pool_reduce": POOL_REDUCE,
    "prior": PRIOR, "react_calls": REACT_CALLS, "budget_alloc": BUDGET_ALLOC,
}
_NUMPY_OF: dict[torch.dtype, np.dtype] = {torch.float32: np.dtype(np.float32), torch.int64: np.dtype(np.int64),
                                          torch.float64: np.dtype(np.float64), torch.int32: np.dtype(np.int32)}

# Positions are exact int64 end to end and must lie in [0, POSITION_LIMIT): the headroom above
# 2^62 keeps padding sentinels (int64 max) and "position + k" arithmetic clear of overflow.
POSITION_LIMIT = 1 << 62
_INT32_MAX = (1 << 31) - 1

# A shape with more elements than this is rejected before any allocation (2^40 elements is
# far beyond any summary and keeps prod(shape) * itemsize inside int64).
_MAX_ELEMENTS = 1 << 40


class WireError(ValueError):
    """A wire tensor could not be encoded or decoded; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _dtype_name(wire_dtype: int) -> str:
    try:
        return pb.DType.Name(wire_dtype)
    except ValueError:
        return str(wire_dtype)


def tensor_to_proto(
    t: torch.Tensor, dtype: int | torch.dtype | None = None, *, field: str = "tensor"
) -> pb.Tensor:
    """Pack ``t`` into a ``nexus.v1.Tensor``.

    ``dtype`` (a wire ``DType`` value or a torch dtype) converts the tensor first, e.g. fp32
    attention sent as fp16; by default the tensor's own dtype is used and must be one of the
    wire dtypes. The tensor is moved to CPU and made contiguous (C order).
    """
    if dtype is None:
        target = t.dtype
    elif isinstance(dtype, torch.dtype):
        target = dtype
    else:
        if dtype not in WIRE_DTYPES:
            raise WireError(field, f"unknown wire dtype {_dtype_name(dtype)}")
        target = WIRE_DTYPES[dtype][0]
    if target not in _TORCH_TO_WIRE:
        allowed = ", ".join(str(d) for d in _TORCH_TO_WIRE)
        raise WireError(field, f"dtype {target} cannot travel on the wire (allowed: {allowed})")
    wire = _TORCH_TO_WIRE[target]
    np_dtype = WIRE_DTYPES[wire][1]
    arr = t.detach().to(device="cpu", dtype=target).contiguous().numpy()
    # astype to the explicit little-endian dtype is a no-op on little-endian hosts.
    data = arr.astype(np_dtype, copy=False).tobytes(order="C")
    return pb.Tensor(dtype=wire, shape=list(t.shape), data=data)


def wire_array(msg: pb.Tensor, *, field: str) -> np.ndarray:
    """A read-only numpy view of a ``nexus.v1.Tensor``'s elements (flat, little-endian, no copy).

    The same checks as :func:`tensor_from_proto` (dtype, shape, byte length), without decoding:
    callers that concatenate many tensors convert once, after their own checks.
    """
    if msg.dtype not in WIRE_DTYPES:
        raise WireError(field, f"unknown or unspecified dtype {_dtype_name(msg.dtype)}")
    np_dtype = WIRE_DTYPES[msg.dtype][1]
    shape = tuple(msg.shape)
    if shape and min(shape) < 0:
        raise WireError(field, f"negative dimension in shape {list(shape)}")
    numel = math.prod(shape)
    if numel > _MAX_ELEMENTS:
        raise WireError(field, f"shape {list(shape)} has {numel} elements, more than {_MAX_ELEMENTS}")
    data = msg.data  # one access: upb hands out a fresh bytes object each time
    if len(data) != numel * np_dtype.itemsize:
        raise WireError(field, f"data has {len(data)} bytes but shape {list(shape)} of {_dtype_name(msg.dtype)} "
                               f"needs {numel * np_dtype.itemsize}")
    return np.frombuffer(data, dtype=np_dtype, count=numel)


def tensor_from_proto(msg: pb.Tensor, *, field: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a ``nexus.v1.Tensor`` into a CPU torch tensor.

    Raises ``WireError(field, reason)`` for an unknown dtype, a negative dimension, or a data
    length that is not ``prod(shape) * itemsize``. The result owns its memory (writable).
    """
    if msg.dtype not in WIRE_DTYPES:
        raise WireError(field, f"unknown or unspecified dtype {_dtype_name(msg.dtype)}")
    np_dtype = WIRE_DTYPES[msg.dtype][1]
    shape = tuple(msg.shape)  # repeated int64: already Python ints (no per-element generator: hot path)
    if shape and min(shape) < 0:
        raise WireError(field, f"negative dimension in shape {list(shape)}")
    numel = math.prod(shape)
    if numel > _MAX_ELEMENTS:
        raise WireError(field, f"shape {list(shape)} has {numel} elements, more than {_MAX_ELEMENTS}")
    expected = numel * np_dtype.itemsize
    if len(msg.data) != expected:
        raise WireError(
            field,
            f"data has {len(msg.data)} bytes but shape {list(shape)} of "
            f"{_dtype_name(msg.dtype)} needs {expected}",
        )
    arr = np.frombuffer(msg.data, dtype=np_dtype, count=numel)
    # numpy would accept any non-zero byte as a bool whose torch view is not 0/1; reject it
    # instead of coercing.
    if msg.dtype == pb.D_TYPE_BOOL and numel and int(arr.view(np.uint8).max()) > 1:
        raise WireError(field, "bool data must be bytes 0 or 1")
    # frombuffer views the immutable protobuf bytes: copy once into native byte order so the
    # tensor is writable and owns its memory.
    target = _NUMPY_OF.get(as_dtype, np_dtype.newbyteorder("=")) if as_dtype is not None else \
        np_dtype.newbyteorder("=")
    out = arr.astype(target, copy=True)  # one copy, straight to the dtype the caller computes in
    return torch.from_numpy(out).reshape(shape)


def int_wire_dtype(t: torch.Tensor) -> torch.dtype:
    """int32 when every value of ``t`` fits (half the bytes), else int64: positions stay exact."""
    if t.numel() == 0:
        return torch.int32
    lo, hi = torch.aminmax(t.detach().reshape(-1).to(torch.int64))
    return torch.int32 if int(lo) >= -_INT32_MAX - 1 and int(hi) <= _INT32_MAX else torch.int64


_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_SMALL = 32


def _mix64(p: int) -> int:
    """The per-position term of :func:`positions_checksum` (splitmix64 finalizer of p + golden)."""
    z = ((p & _MASK64) + _GOLDEN64) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def positions_checksum(pos: torch.Tensor) -> int:
    """Order-independent 64-bit digest of a set of int positions (an int in [0, 2^64)).

    Each position (as a 64-bit two's-complement integer, so no two positions of [0, 2^62) share a
    term) goes through the splitmix64 finalizer after adding the 64-bit golden-ratio constant,
    and the mixed values are summed mod 2^64. The sum makes it independent of order and lets both
    sides update it per step (add the new positions' terms, subtract the evicted ones'); the
    bijective non-linear mix makes it sensitive to *which* positions are held, so two different
    sets agree with probability ~2^-64 (a 32-bit sum of positions taken mod 2^32 could not tell
    2^32 + 19 from 19). Computed without a Python loop for large sets. An empty set gives 0.
    Worker and sidecar must use this same function.
    """
    if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.is_complex():
        raise WireError("positions", f"positions must be integers, got {pos.dtype}")
    if pos.numel() <= _SMALL:
        # A decode step adds and evicts a handful of positions: plain ints beat array setup.
        return sum(_mix64(p) for p in pos.reshape(-1).tolist()) & _MASK64
    return int(mix64(pos.detach().reshape(-1).to("cpu", torch.int64).numpy()).sum(dtype=np.uint64))


def mix64(pos: np.ndarray) -> np.ndarray:
    """The per-position terms of :func:`positions_checksum` for an int64 array (uint64, same shape).

    numpy uint64 arithmetic wraps mod 2^64 (exactly the splitmix64 arithmetic); summing segments of
    the result (mod 2^64) gives each segment's checksum, for a whole batch at once.
    """
    z = np.ascontiguousarray(pos, dtype=np.int64).view(np.uint64) + np.uint64(_GOLDEN64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z
