"""Resync: rebuild a session's engine state from the worker's truth.

After a failover to an older checkpoint (or a lost store) the sidecar's state is behind the
worker's KV cache, and every step is refused (FAILED_PRECONDITION: expected step / checksum).
The worker holds the truth: which positions it retains and its step number. :func:`reseed`
keeps what the sidecar's state still knows about each of those positions (age, policy memory,
edges to other retained positions) and admits the others as newcomers (age 0, no memory, no
edges), exactly as a token that has just arrived.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import POSITION_LIMIT, tensor_from_proto

from nexus_sidecar.engine import PolicyConfig, SessionState
from nexus_sidecar.engine.state import GroupState
from nexus_sidecar.server.errors import InvalidArgument


@dataclass(frozen=True)
class Reseeded:
    """The rebuilt state and how much of it the sidecar knew."""

    state: SessionState
    known: int
    admitted: int


def retained_positions(msgs: list[pb.Tensor], cfg: PolicyConfig) -> list[torch.Tensor]:
    """Decode and check the worker's retained positions (one tensor per group)."""
    if len(msgs) != cfg.groups:
        raise InvalidArgument("retained", f"{len(msgs)} groups sent, the session has {cfg.groups}")
    out = []
    # With a shared budget (budget_alloc = "shared") one group may hold what the others gave up.
    shared = cfg.budget_alloc == "shared"
    cap = cfg.groups * (cfg.budget + cfg.slack) if shared else cfg.budget + cfg.slack
    what = "groups x (budget + slack)" if shared else "budget + slack"
    for g, msg in enumerate(msgs):
        name = f"retained[{g}]"
        if msg.dtype not in (pb.D_TYPE_INT32, pb.D_TYPE_INT64):
            raise InvalidArgument(name, "expected int32 or int64 positions")
        pos = tensor_from_proto(msg, field=name, as_dtype=torch.int64)
        if pos.dim() != 1:
            raise InvalidArgument(name, f"must be 1-D, got shape {list(pos.shape)}")
        if pos.numel() > cap:
            raise InvalidArgument(name, f"{pos.numel()} positions, more than {what} = {cap}")
        if pos.numel():
            if int(pos.min()) < 0 or int(pos.max()) >= POSITION_LIMIT:
                raise InvalidArgument(name, "positions must lie in [0, 2^62)")
            if pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all()):
                raise InvalidArgument(name, "positions must be strictly ascending")
        out.append(pos)
    if shared and sum(p.numel() for p in out) > cap:
        raise InvalidArgument("retained", f"{sum(p.numel() for p in out)} positions in all, more than the shared "
                                          f"budget {what} = {cap}")
    return out


def reseed(cfg: PolicyConfig, prior: SessionState | None, retained: list[torch.Tensor], step: int) -> Reseeded:
    """The session state for the worker's ``retained`` positions at ``step``, keeping ``prior``'s
    knowledge of the positions it still holds (``prior`` None: everything is a newcomer)."""
    F = cfg.fanout
    groups, known = [], 0
    for g, pos in enumerate(retained):
        n = pos.numel()
        age = torch.zeros(n, dtype=torch.int32)
        memory = torch.zeros(n, dtype=torch.float32)
        edge_pos = torch.full((n, F), -1, dtype=torch.int64)
        edge_w = torch.zeros(n, F, dtype=torch.float32)
        old = prior.groups[g] if prior is not None else None
        if old is not None and old.pos.numel() and n:
            idx = torch.searchsorted(old.pos, pos).clamp(max=old.pos.numel() - 1)
            hit = old.pos[idx] == pos
            src = idx[hit]
            age[hit] = old.age[src]
            memory[hit] = old.memory[src]
            # Edges survive only towards positions the worker still holds.
            e, w = old.edge_pos[src], old.edge_w[src]
            alive = torch.isin(e, pos) & (w > 0)
            edge_pos[hit] = torch.where(alive, e, -1)
            edge_w[hit] = torch.where(alive, w, 0.0)
            known += int(hit.sum())
        groups.append(GroupState(pos.clone(), age, memory, edge_pos, edge_w))
    total = sum(p.numel() for p in retained)
    calls = prior.calls if prior is not None else step
    seen = prior.tokens_seen if prior is not None else 0
    evicted = prior.tokens_evicted if prior is not None else 0
    return Reseeded(SessionState(cfg, calls, seen, evicted, groups), known, total - known)
