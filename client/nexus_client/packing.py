"""Turning a worker's per-call summary (torch tensors) into a ``SessionStep`` and back."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nexus_client.v1 import sidecar_pb2 as pb
from nexus_client.wire import CALL_KIND, int_wire_dtype, positions_checksum, tensor_from_proto, tensor_to_proto


@dataclass
class WorkerSession:
    """The worker's side of a session: the next step number and what it holds.

    ``retained_count``/``retained_checksum`` describe the tokens the worker holds *before* the
    next step (summed over groups); the sidecar refuses a step when they disagree with its state.
    """

    session_id: str
    groups: int
    step: int = 0
    retained_count: int = 0
    retained_checksum: int = 0
    positions: list[torch.Tensor] = field(default_factory=list)  # retained per group (kept by ``advance``)

    def apply(self, result: pb.SessionResult) -> None:
        """Advance after a successful step."""
        self.step = result.step
        self.retained_count = result.retained_count
        self.retained_checksum = result.retained_checksum

    def advance(self, new_positions: torch.Tensor, result: pb.SessionResult) -> None:
        """:meth:`apply`, and track the retained positions per group (what a resync sends).

        ``positions[g]`` becomes the kept slots of this call: the retained positions, then the new
        ones, filtered by the sidecar's keep mask.
        """
        self.track(unpack_result(result)[0], new_positions)
        self.apply(result)

    def track(self, keep: torch.Tensor, new_positions: torch.Tensor) -> None:
        """Keep per group the slots of one call (held positions, then ``new_positions``) that the
        sidecar's ``keep`` mask (bool ``[G, >= slots]``) retained."""
        new = new_positions.detach().to("cpu", torch.int64).reshape(-1)
        held = self.positions or [torch.zeros(0, dtype=torch.int64) for _ in range(self.groups)]
        out = []
        for g in range(self.groups):
            slots = torch.cat([held[g], new])
            out.append(slots[keep[g, : slots.numel()]])
        self.positions = out


def pack_step(ws: WorkerSession, new_positions: torch.Tensor, attn: torch.Tensor, last: torch.Tensor,
              edge_pos: torch.Tensor, edge_w: torch.Tensor, *, float_dtype: torch.dtype = torch.float32,
              step: int | None = None, key_diversity: torch.Tensor | None = None,
              key_norm: torch.Tensor | None = None, value_norm: torch.Tensor | None = None,
              call: str = "unspecified") -> pb.SessionStep:
    """The wire message for the worker's next step (or ``step`` for a retry).

    ``call``: what the step's queries are ("context", "question", "decode"; see ``wire.CALL_KIND``).

    The priors (float ``[G, n + k]``, aligned with ``attn``; ``**cache_priors(cache, G)`` passes all
    three) are optional; ``None`` leaves the field unset. They travel as ``float_dtype`` like attn.
    """
    priors = {name: tensor_to_proto(t, float_dtype, field=name)
              for name, t in (("key_diversity", key_diversity), ("key_norm", key_norm), ("value_norm", value_norm))
              if t is not None}
    return pb.SessionStep(
        session_id=ws.session_id, step=ws.step + 1 if step is None else step,
        retained_count=ws.retained_count, retained_checksum=ws.retained_checksum,
        # int32 while positions fit, int64 beyond 2^31 - 1 (exact; never wrapped).
        new_positions=tensor_to_proto(new_positions, int_wire_dtype(new_positions), field="new_positions"),
        attn=tensor_to_proto(attn, float_dtype, field="attn"),
        last=tensor_to_proto(last, float_dtype, field="last"),
        edge_index=tensor_to_proto(edge_pos, int_wire_dtype(edge_pos), field="edge_index"),
        edge_weight=tensor_to_proto(edge_w, float_dtype, field="edge_weight"),
        call=_call_kind(call),
        **priors,
    )


def _call_kind(call: str) -> int:
    try:
        return CALL_KIND[call]
    except KeyError:
        raise ValueError(f"call: must be one of {list(CALL_KIND)}, got {call!r}") from None


def unpack_result(result: pb.SessionResult) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(keep mask bool [G, n + k], evicted positions per group as int64)."""
    keep = tensor_from_proto(result.keep, field="keep").to(torch.bool)
    evicted = [tensor_from_proto(g.positions, field="evicted").to(torch.int64) for g in result.evicted]
    return keep, evicted


def checksum_of(positions: list[torch.Tensor]) -> int:
    """The sidecar's retained-positions checksum of a worker's groups (64-bit, summed mod 2^64)."""
    return sum(positions_checksum(p) for p in positions) & ((1 << 64) - 1)


def top_edges(
    rows: torch.Tensor, slot_positions: torch.Tensor, fanout: int, exclude_self: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``fanout`` attended slots of each of the last ``q`` slots' query rows.

    ``rows``: ``[q, L]`` attention rows of the q newest slots (the last q of ``slot_positions``,
    ``[L]``). Returns ``(edge_pos [q, F] int64, edge_w [q, F] float32)`` with absolute positions,
    padded with ``-1``/``0`` where a row has fewer than F positive weights. A token's attention to
    itself is dropped when ``exclude_self``: a self-loop says nothing about *other* tokens and would
    only inflate the token's own walk score.
    """
    q, length = rows.shape
    if slot_positions.shape != (length,):
        raise ValueError(f"slot_positions has shape {tuple(slot_positions.shape)}, rows have {length} slots")
    if q > length:
        raise ValueError(f"{q} query rows but only {length} slots")
    w = rows.float().clone()
    if exclude_self:
        self_idx = torch.arange(length - q, length, device=w.device)
        w[torch.arange(q, device=w.device), self_idx] = 0.0
    f = min(fanout, length)
    vals, idx = torch.topk(w, f, dim=-1)
    pos = slot_positions.to(w.device)[idx]
    valid = vals > 0
    edge_pos = torch.full((q, fanout), -1, dtype=torch.int64, device=w.device)
    edge_w = torch.zeros((q, fanout), dtype=torch.float32, device=w.device)
    edge_pos[:, :f] = torch.where(valid, pos, torch.full_like(pos, -1))
    edge_w[:, :f] = torch.where(valid, vals, torch.zeros_like(vals))
    return edge_pos, edge_w
