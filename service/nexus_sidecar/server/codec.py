"""Conversions between wire messages (nexus.v1) and engine objects, with precise errors."""

from __future__ import annotations

import math
from dataclasses import fields

import torch
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import ENUM_FIELDS, positions_checksum

from nexus_sidecar.engine import PolicyConfig
from nexus_sidecar.server.errors import BRIEF, InvalidArgument, brief

_ENUM_NAMES = {field: {v: k for k, v in names.items()} for field, names in ENUM_FIELDS.items()}
_OPTIONAL_NUMBERS = ("budget", "slack", "sinks", "recent", "groups", "beta", "iterations", "fanout", "gamma",
                     "tau", "seed", "pool", "block_size", "prior_mix",
                     "prior_sharpness", "question_prior_mix", "budget_floor")


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
