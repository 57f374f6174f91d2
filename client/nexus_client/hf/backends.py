"""Where eviction decisions come from: the policy backend protocol and the in-process backend.

A backend only needs three calls: ``open(config) -> session``, ``step(session, StepTensors) ->
StepDecision`` and ``close(session)``; a worker that decodes several sequences at once also uses
``step_many(sessions, tensors) -> [StepDecision]`` (one call for all of them: one engine step
in-process, one ``StepBatch`` for a sidecar). The config is a plain mapping of the engine's
``PolicyConfig`` fields (so a remote backend can serialise it without importing the engine), and
the step carries the tensors of :class:`~nexus_client.summary.StepTensors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from nexus_client.summary import StepTensors


@dataclass
class StepDecision:
    """A policy's answer for one call.

    ``keep``: bool ``[G, n_max + k]`` aligned with the slots of the call (False on padding).
    ``evicted``: G int64 tensors of the positions evicted by the call.
    """

    keep: torch.Tensor
    evicted: list[torch.Tensor]


@runtime_checkable
class PolicyBackend(Protocol):
    """Anything that can run an eviction policy session for one sequence."""

    def open(self, config: Mapping[str, Any]) -> Any:
        """Open a session with the given policy config fields; return its handle."""
        ...

    def step(self, session: Any, tensors: StepTensors) -> StepDecision:
        """Submit one call's summary; return which slots to keep."""
        ...

    def close(self, session: Any) -> None:
        """Release the session."""
        ...


class LocalBackend:
    """Runs the policy in-process with ``nexus_sidecar.engine`` (no server, no network)."""

    def __init__(self, device: str = "cpu", engine: Any = None) -> None:
        try:
            from nexus_sidecar.engine import Engine
        except ImportError as exc:  # the engine ships in the same distribution; say what is missing
            raise ImportError(
                "LocalBackend needs nexus_sidecar.engine (install the nexus-sidecar distribution)"
            ) from exc
        self.engine = engine if engine is not None else Engine(device=device)

    def open(self, config: Mapping[str, Any]) -> int:
        """Validate ``config`` as an engine ``PolicyConfig`` and open a session."""
        from nexus_sidecar.engine import PolicyConfig

        cfg = PolicyConfig(**dict(config))
        cfg.validate()
        return self.engine.open(cfg)

    def step(self, session: int, tensors: StepTensors) -> StepDecision:
        """Run one engine step for ``session``."""
        return self.step_many([session], [tensors])[0]

    def step_many(self, sessions: Sequence[int], tensors: Sequence[StepTensors]) -> list[StepDecision]:
        """One engine call for several sessions (a worker decoding a batch of sequences): one batched
        engine step, one decision per session in order."""
        from nexus_sidecar.engine import StepInput

        if len(sessions) != len(tensors) or len(set(sessions)) != len(sessions):
            raise ValueError(f"step_many: {len(sessions)} distinct sessions expected for {len(tensors)} summaries")
        out = self.engine.step(
            {
                s: StepInput(
                    new_positions=t.new_positions,
                    attn=t.attn,
                    last=t.last,
                    edge_pos=t.edge_pos,
                    edge_w=t.edge_w,
                    call=t.call,
                    **t.priors,
                )
                for s, t in zip(sessions, tensors, strict=True)
            }
        )
        return [StepDecision(keep=out[s].keep.cpu(), evicted=[e.cpu() for e in out[s].evicted]) for s in sessions]

    def positions(self, session: int) -> list[torch.Tensor]:
        """Retained positions per group, as the engine sees them (for consistency checks)."""
        return [p.cpu() for p in self.engine.positions(session)]

    def close(self, session: int) -> None:
        """Close the engine session."""
        self.engine.close(session)
