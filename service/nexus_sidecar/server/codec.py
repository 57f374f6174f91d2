"""Conversions between wire messages (nexus.v1) and engine objects, with precise errors."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import torch
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import CALL_KIND, ENUM_FIELDS, POSITION_LIMIT, PRIORS, positions_checksum, tensor_from_proto

from nexus_sidecar.engine import PolicyConfig, StepInput, StepOutput
from nexus_sidecar.server.errors import BRIEF, InvalidArgument, brief

_FLOAT_WIRE = (pb.D_TYPE_FLOAT16, pb.D_TYPE_FLOAT32)
_INT_WIRE = (pb.D_TYPE_INT32, pb.D_TYPE_INT64)
_ENUM_NAMES = {field: {v: k for k, v in names.items()} for field, names in ENUM_FIELDS.items()}
_CALL_NAMES = {v: k for k, v in CALL_KIND.items()}
_OPTIONAL_NUMBERS = ("budget", "slack", "sinks", "recent", "groups", "beta", "iterations", "fanout", "gamma",
                     "tau", "seed", "pool", "block_size", "prior_mix",
                     "prior_sharpness", "question_prior_mix")


def config_from_proto(msg: pb.PolicyConfig, default_policy: str) -> PolicyConfig:
    """Effective engine config: unset fields take the engine defaults. Validates (ConfigError)."""
    if len(msg.policy) > BRIEF:  # the engine's error would quote it whole
        raise InvalidArgument("config.policy", f"unknown policy {brief(msg.policy)}")
    values: dict[str, object] = {"policy": msg.policy or default_policy}
    for name in _OPTIONAL_NUMBERS:
        if msg.HasField(name):
            value = getattr(msg, name)
            if name == "seed":
                value = value - (1 << 64) if value >= (1 << 63) else value  # uint64 on the wire
            values[name] = value
    for name, names in _ENUM_NAMES.items():
        value = getattr(msg, name)
        if value:  # 0 = UNSPECIFIED: the engine default; an unknown number fails validation by name
            values[name] = names.get(value, str(value))
    return PolicyConfig(**values).validate()  # type: ignore[arg-type]


def config_to_proto(cfg: PolicyConfig) -> pb.PolicyConfig:
    """Every field set explicitly (the effective config)."""
    msg = pb.PolicyConfig(policy=cfg.policy)
    for f in fields(cfg):
        if f.name in _OPTIONAL_NUMBERS:
            value = getattr(cfg, f.name)
            if value is None:  # an optional knob left to its meaning "unset" (question_prior_mix)
                continue
            if f.name == "seed":
                value &= (1 << 64) - 1
            setattr(msg, f.name, value)
    for name, names in ENUM_FIELDS.items():
        setattr(msg, name, names[getattr(cfg, name)])
    return msg


def _tensor(step: pb.SessionStep, name: str, allowed: tuple[int, ...], what: str, as_dtype: torch.dtype,
            *, required: bool = True) -> torch.Tensor | None:
    if not step.HasField(name):
        if not required:
            return None
        raise InvalidArgument(f"steps[{step.session_id}].{name}", "is required")
    msg = getattr(step, name)
    if msg.dtype not in allowed:
        raise InvalidArgument(f"steps[{step.session_id}].{name}",
                              f"dtype {pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype} "
                              f"not allowed; {what}")
    return tensor_from_proto(msg, field=f"steps[{step.session_id}].{name}", as_dtype=as_dtype)


def step_input(step: pb.SessionStep) -> StepInput:
    """Decode one SessionStep's tensors (shape checks against the session are the engine's).

    The priors are optional: an unset field is an absent prior (the engine decides what that means
    for the session's policy)."""
    ints, floats = "expected int32 or int64", "expected float16 or float32"
    pos = _tensor(step, "new_positions", _INT_WIRE, ints, torch.int64)
    _check_range(step, "new_positions", pos, 0)
    attn = _tensor(step, "attn", _FLOAT_WIRE, floats, torch.float32)
    last = _tensor(step, "last", _FLOAT_WIRE, floats, torch.float32)
    eidx = _tensor(step, "edge_index", _INT_WIRE, ints, torch.int64)
    _check_range(step, "edge_index", eidx, -1)
    ew = _tensor(step, "edge_weight", _FLOAT_WIRE, floats, torch.float32)
    priors = {name: _tensor(step, name, _FLOAT_WIRE, floats, torch.float32, required=False) for name in PRIORS}
    if step.call not in _CALL_NAMES:
        raise InvalidArgument(f"steps[{step.session_id}].call", f"unknown call kind {step.call}; known: "
                                                                f"{sorted(_CALL_NAMES)}")
    return StepInput(pos, attn, last, eidx, ew, **priors, call=_CALL_NAMES[step.call])  # type: ignore[arg-type]


def _check_range(step: pb.SessionStep, name: str, t: torch.Tensor, low: int) -> None:
    """Positions are exact int64 in [0, 2^62) (``low`` = -1 admits the "no edge" marker)."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.reshape(-1))
    if int(lo) < low or int(hi) >= POSITION_LIMIT:
        bad = int(lo) if int(lo) < low else int(hi)
        raise InvalidArgument(f"steps[{step.session_id}].{name}",
                              f"position {bad} outside [{low}, 2^62)" if low == 0 else
                              f"position {bad} outside [0, 2^62) (or -1 for no edge)")


def session_result(session_id: str, step: int, out: StepOutput, checksum: int) -> pb.SessionResult:
    """Encode an engine output (keep mask + evicted positions per group)."""
    out = out.cpu()
    # Built straight from numpy: this runs once per session-step on the event loop.
    keep = np.ascontiguousarray(out.keep.numpy())
    evicted = [pb.GroupEvictions(group=g, positions=pb.Tensor(dtype=pb.D_TYPE_INT64, shape=[p.numel()],
                                                              data=p.numpy().astype("<i8").tobytes()))
               for g, p in enumerate(out.evicted)]
    return pb.SessionResult(
        session_id=session_id, step=step, keep=pb.Tensor(dtype=pb.D_TYPE_BOOL, shape=list(keep.shape),
                                                         data=keep.tobytes()),
        evicted=evicted, retained_count=sum(out.retained), retained_checksum=checksum,
    )


def checksum_after(before: int, groups: int, new_positions: torch.Tensor, out: StepOutput) -> int:
    """Running checksum: it is a sum of per-position hashes mod 2^64, so add the new and subtract the evicted."""
    added = groups * positions_checksum(new_positions)
    removed = sum(positions_checksum(p) for p in out.cpu().evicted)
    return (before + added - removed) & MASK64


MASK64 = (1 << 64) - 1


def checksum_of(positions: list[torch.Tensor]) -> int:
    """The retained-positions checksum of a session's groups (summed mod 2^64)."""
    return sum(positions_checksum(p) for p in positions) & MASK64


def weight_summary(weights: torch.Tensor) -> pb.WeightSummary:
    """min/max/mean/p50/p90 of a group's weights (zeros when empty)."""
    if weights.numel() == 0:
        return pb.WeightSummary()
    w = weights.to(torch.float64)
    q = torch.quantile(w, torch.tensor([0.5, 0.9], dtype=torch.float64))
    vals = [float(w.min()), float(w.max()), float(w.mean()), float(q[0]), float(q[1])]
    vals = [0.0 if math.isnan(v) else v for v in vals]
    return pb.WeightSummary(min=vals[0], max=vals[1], mean=vals[2], p50=vals[3], p90=vals[4])
