"""Local eviction while the sidecar cannot be reached: the worker keeps its KV cache within budget
by itself (StreamingLLM: the first ``sinks`` slots and the most recent ones) and resyncs the
sidecar once it answers again, so a sidecar outage never stalls decoding and never loses a session.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nexus_client.packing import WorkerSession, checksum_of

FALLBACKS = ("wait", "streaming")


@dataclass(frozen=True)
class Budget:
    """The eviction knobs the fallback needs (from the session's effective config)."""

    budget: int
    slack: int
    sinks: int


def streaming_keep(session: WorkerSession, new_positions: torch.Tensor, width: int, b: Budget) -> torch.Tensor:
    """StreamingLLM's keep mask ``[G, width]`` for this call's slots (retained ascending, then new):
    everything while a group holds at most ``budget + slack`` slots, else its first ``sinks`` slots
    and its last ``budget - sinks``. Padding beyond a group's slots is False."""
    k = int(new_positions.numel())
    held = session.positions or [torch.zeros(0, dtype=torch.int64)] * session.groups
    keep = torch.zeros(session.groups, width, dtype=torch.bool)
    for g in range(session.groups):
        n = int(held[g].numel()) + k
        if n <= b.budget + b.slack:
            keep[g, :n] = True
        else:
            keep[g, : b.sinks] = True
            keep[g, n - (b.budget - b.sinks) : n] = True
    return keep


def advance_locally(session: WorkerSession, new_positions: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
    """Apply a locally decided call to the worker's session: positions, step, count and checksum
    (the sidecar does not know them: a resync tells it). Returns the evicted positions per group."""
    new = new_positions.detach().to("cpu", torch.int64).reshape(-1)
    held = session.positions or [torch.zeros(0, dtype=torch.int64)] * session.groups
    kept, evicted = [], []
    for g in range(session.groups):
        slots = torch.cat([held[g], new])
        mask = keep[g, : slots.numel()]
        kept.append(slots[mask])
        evicted.append(slots[~mask])
    session.positions = kept
    session.step += 1
    session.retained_count = sum(int(p.numel()) for p in kept)
    session.retained_checksum = checksum_of(kept)
    return evicted
