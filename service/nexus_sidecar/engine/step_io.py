"""What a caller hands the engine for one session, and what it gets back."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from nexus_sidecar.engine.config import PRIORS

# Allowed value range of each prior (inclusive); anything else is rejected, never clipped.
PRIOR_RANGES: dict[str, tuple[float, float]] = {
    "key_diversity": (-1.0, 1.0),  # a negated cosine
    "key_norm": (0.0, math.inf),
    "value_norm": (0.0, math.inf),
}


@dataclasses.dataclass
class StepInput:
    """One call for one session (k >= 1 new tokens since the last call).

    Slots of the call = the retained positions of each group (ascending) followed by the k new
    positions; ``attn``/``last`` columns are aligned with them, right-padded with zeros to the
    longest group in per-layer mode.

    The query-agnostic priors are optional, aligned with the slots like ``attn`` and computed by
    the worker from the keys and values it holds (``nexus_client.hf.priors.cache_priors``), each
    averaged over the kv heads and the layers of the group. ``None`` = not sent: policies that
    score by a prior (``keydiff``, ``knorm``) refuse the step, Nexus falls back to attention alone.

    ``call`` says what the call's queries are (one of ``config.CALL_KINDS``): a context chunk, a
    question, a decode step, or "unspecified" (old clients). Nexus reads it (``react_calls``,
    ``question_prior_mix``); the other policies ignore it.
    """

    new_positions: torch.Tensor  # int [k], ascending, after every retained position
    attn: torch.Tensor  # float [G, n + k]: attention mass of the k new queries per slot (summed)
    last: torch.Tensor  # float [G, n + k]: attention row of the newest query
    edge_pos: torch.Tensor  # int [G, k, F]: each new token's top-F attended positions, -1 = none
    edge_w: torch.Tensor  # float [G, k, F]: their attention weights
    key_diversity: torch.Tensor | None = None  # float [G, n + k] in [-1, 1]: -cos(key, group's mean unit key)
    key_norm: torch.Tensor | None = None  # float [G, n + k] >= 0: L2 norm of the slot's key
    value_norm: torch.Tensor | None = None  # float [G, n + k] >= 0: L2 norm of the slot's value
    call: str = "unspecified"

    def priors(self) -> dict[str, torch.Tensor]:
        """The priors this step carries, by name (in ``PRIORS`` order)."""
        return {name: t for name in PRIORS if (t := getattr(self, name)) is not None}

    def to(self, device: str | torch.device) -> StepInput:
        """A copy with every tensor on ``device`` (absent priors stay absent)."""
        return dataclasses.replace(self, **{f.name: t.to(device) for f in dataclasses.fields(self)
                                            if isinstance(t := getattr(self, f.name), torch.Tensor)})


@dataclasses.dataclass
class StepOutput:
    """Result of one call for one session. Tensors live on the engine's device unless moved."""

    keep: torch.Tensor  # bool [G, n + k] aligned with the call's slots
    slot_positions: torch.Tensor  # int64 [G, n + k] the call's slots (-1 on padding)
    retained: list[int]  # slots kept per group after the call
    retained_mass: torch.Tensor  # float32 [G] share of this call's attention on kept slots
    evicted_age: torch.Tensor  # int32 [G, n + k] age (calls) of evicted tokens, 0 elsewhere

    @functools.cached_property
    def evicted(self) -> list[torch.Tensor]:
        """Evicted positions per group (ascending)."""
        if self.keep.device.type == "cpu":  # numpy: far less per-op overhead on these small rows
            keep, pos = self.keep.numpy(), self.slot_positions.numpy()
            mask = ~keep & (pos >= 0)
            return [torch.from_numpy(pos[g][mask[g]]) for g in range(keep.shape[0])]
        mask = ~self.keep & (self.slot_positions >= 0)
        return [self.slot_positions[g][mask[g]] for g in range(self.keep.shape[0])]

    @property
    def n_evicted(self) -> int:
        """Total evictions over all groups in this call."""
        return int((~self.keep & (self.slot_positions >= 0)).sum())

    def cpu(self) -> StepOutput:
        """A copy with every tensor on the host (``self`` when they already are)."""
        if self.keep.device.type == "cpu":
            return self
        return StepOutput(self.keep.cpu(), self.slot_positions.cpu(), self.retained,
                          self.retained_mass.cpu(), self.evicted_age.cpu())


@dataclasses.dataclass
class BatchInput:
    """One call for B sessions at once, in the columnar form a server decodes off the wire.

    Every session takes the same ``k`` new tokens and lays out the same ``n + k`` slots (the steady
    state of a decode loop). Rows are the sessions' groups stacked in order: session 0's G_0 rows,
    then session 1's, ... (``groups``); each row's fields are :class:`StepInput`'s for that group.
    Floats may be float16/bfloat16/float32 (converted inside the call), positions any integer type.
    """

    new_positions: torch.Tensor  # int [B, k]
    attn: torch.Tensor  # float [R, n + k]
    last: torch.Tensor  # float [R, n + k]
    edge_pos: torch.Tensor  # int [R, k, F]
    edge_w: torch.Tensor  # float [R, k, F]
    groups: list[int]  # G per session; R = sum(groups)
    priors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # name -> float [R, n + k]
    call: str = "unspecified"

    def __len__(self) -> int:
        return len(self.groups)

    def session(self, b: int, r0: int) -> StepInput:
        """Session ``b``'s input (views; ``r0`` = its first row)."""
        g = self.groups[b]
        rows = slice(r0, r0 + g)
        return StepInput(self.new_positions[b], self.attn[rows], self.last[rows], self.edge_pos[rows],
                         self.edge_w[rows], **{name: t[rows] for name, t in self.priors.items()}, call=self.call)

    def sessions(self) -> list[StepInput]:
        """Every session's :class:`StepInput` (views): the per-session form of the same call."""
        out, r0 = [], 0
        for b, g in enumerate(self.groups):
            out.append(self.session(b, r0))
            r0 += g
        return out


@dataclasses.dataclass
class BatchOutput:
    """Result of one :class:`BatchInput` call, rows as in the input, slots padded to the widest
    session (``widths``). A session in ``errors`` was left unchanged; its rows hold no result."""

    keep: torch.Tensor  # bool [R, W]
    slot_positions: torch.Tensor  # int64 [R, W] (-1 on padding)
    retained_mass: torch.Tensor  # float32 [R]
    evicted_age: torch.Tensor  # int32 [R, W]
    count: torch.Tensor  # int64 [R]: slots kept per row after the call
    groups: list[int]
    widths: list[int]  # n + k per session
    errors: dict[int, Exception] = dataclasses.field(default_factory=dict)  # session index -> EngineError

    def session(self, b: int, r0: int) -> StepOutput:
        """Session ``b``'s output (views; ``r0`` = its first row)."""
        g, w = self.groups[b], self.widths[b]
        rows = slice(r0, r0 + g)
        return StepOutput(self.keep[rows, :w], self.slot_positions[rows, :w], self.count[rows].tolist(),
                          self.retained_mass[rows], self.evicted_age[rows, :w])
