"""Worker-side accumulation of attention between policy calls, and top-F edge extraction.

Between two policy calls the KV cache only grows (new tokens are appended; slots retained by
earlier calls keep their order), so the summed attention of every forward pass since the last
call lines up slot by slot once shorter vectors are right-padded with zeros. One policy call then
carries one summary: ``attn[g, i]`` (mass the pending new queries paid to slot i), ``last[g, i]``
(the newest query's row) and, for every pending new token, its top-F edges (absolute positions and
weights, ``-1``/``0`` padding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nexus_client.hf.capture import ForwardCapture
from nexus_client.packing import top_edges

__all__ = ["AttentionAccumulator", "StepTensors", "top_edges"]


@dataclass
class StepTensors:
    """The summary of one policy call (mirrors the engine's ``StepInput``; no engine import needed).

    ``new_positions`` int64 ``[k]``; ``attn``/``last`` float32 ``[G, n_max + k]`` (zero right padding
    for groups holding fewer slots); ``edge_pos`` int64 ``[G, k, F]`` (-1 = none); ``edge_w`` float32
    ``[G, k, F]``; ``priors``: the query-agnostic priors of every slot (``{name: float32 [G, n_max +
    k]}``, :func:`nexus_client.hf.priors.cache_priors`), empty when not sent; ``call``: what the
    call's queries are (``nexus_client.wire.CALL_KIND``: context, question, decode, unspecified).
    """

    new_positions: torch.Tensor
    attn: torch.Tensor
    last: torch.Tensor
    edge_pos: torch.Tensor
    edge_w: torch.Tensor
    priors: dict[str, torch.Tensor] = field(default_factory=dict)
    call: str = "unspecified"


class AttentionAccumulator:
    """Sums captures between policy calls and builds one :class:`StepTensors` per call.

    ``window``: when set, ``attn`` is the mass of only the last ``window`` query rows added since
    the last call (SnapKV's observation window), across forward passes: a question shorter than the
    window borrows the last rows of the context before it. ``None`` sums every pending query.
    """

    def __init__(self, groups: int, fanout: int, exclude_self: bool = True, window: int | None = None) -> None:
        if groups < 1 or fanout < 1:
            raise ValueError(f"groups and fanout must be >= 1, got groups={groups} fanout={fanout}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.groups = groups
        self.fanout = fanout
        self.exclude_self = exclude_self
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (called after each policy call)."""
        self._mass: list[torch.Tensor | None] = [None] * self.groups
        self._last: list[torch.Tensor | None] = [None] * self.groups
        self._new: list[torch.Tensor] = []
        self._edge_pos: list[list[torch.Tensor]] = [[] for _ in range(self.groups)]
        self._edge_w: list[list[torch.Tensor]] = [[] for _ in range(self.groups)]
        self._tail: list[torch.Tensor | None] = [None] * self.groups  # last `window` rows, right-padded

    @property
    def pending(self) -> int:
        """Number of new tokens since the last policy call."""
        return sum(int(t.numel()) for t in self._new)

    def add(self, capture: ForwardCapture, new_positions: torch.Tensor, slot_positions: list[torch.Tensor]) -> None:
        """Add one forward pass: ``new_positions`` ``[q]`` and each group's slot positions after it."""
        if len(capture.mass) != self.groups or len(slot_positions) != self.groups:
            raise ValueError(
                f"expected {self.groups} groups, got capture={len(capture.mass)} slots={len(slot_positions)}"
            )
        q = int(new_positions.numel())
        for g in range(self.groups):
            length = int(slot_positions[g].numel())
            if capture.mass[g].shape != (length,) or capture.rows[g].shape != (q, length):
                raise ValueError(
                    f"group {g}: capture covers {tuple(capture.rows[g].shape)} but the cache holds {length} "
                    f"slots with {q} new"
                )
            if not torch.equal(slot_positions[g][length - q :].cpu(), new_positions.cpu()):
                raise ValueError(f"group {g}: the last {q} slots are not the new positions")
            prev = self._mass[g]
            mass = capture.mass[g].float() if self.window is None else self._window_mass(g, capture.rows[g])
            if prev is not None and self.window is None:
                if prev.numel() > length:
                    raise ValueError(f"group {g}: cache shrank from {prev.numel()} to {length} without a policy call")
                mass = mass.clone()
                mass[: prev.numel()] += prev
            self._mass[g] = mass
            self._last[g] = capture.last[g].float()
            ep, ew = top_edges(capture.rows[g], slot_positions[g], self.fanout, self.exclude_self)
            self._edge_pos[g].append(ep)
            self._edge_w[g].append(ew)
        self._new.append(new_positions.to(torch.int64))

    def _window_mass(self, g: int, rows: torch.Tensor) -> torch.Tensor:
        """Sum of the last ``window`` query rows seen since the last call (older rows zero-padded)."""
        assert self.window is not None
        rows = rows.float()
        tail = self._tail[g]
        if tail is not None:
            tail = torch.nn.functional.pad(tail, (0, rows.shape[1] - tail.shape[1]))
            rows = torch.cat([tail, rows], dim=0)
        self._tail[g] = rows[-self.window :]
        return self._tail[g].sum(dim=0)

    def build(self) -> StepTensors:
        """The summary for one policy call over everything added since the last :meth:`reset`."""
        if not self._new:
            raise RuntimeError("no new tokens accumulated since the last policy call")
        width = max(int(m.numel()) for m in self._mass if m is not None)
        attn = torch.zeros((self.groups, width), dtype=torch.float32)
        last = torch.zeros((self.groups, width), dtype=torch.float32)
        for g in range(self.groups):
            m, lr = self._mass[g], self._last[g]
            assert m is not None and lr is not None  # add() fills every group together
            attn[g, : m.numel()] = m.cpu()
            last[g, : lr.numel()] = lr.cpu()
        edge_pos = torch.stack([torch.cat(e, 0) for e in self._edge_pos]).cpu()
        edge_w = torch.stack([torch.cat(e, 0) for e in self._edge_w]).cpu()
        # Attention is non-negative by construction; clamp float noise so the engine's validation
        # (which rejects negatives) never trips on a -0.0 or a -1e-9 from a subtraction-free sum.
        attn.clamp_(min=0.0)
        last.clamp_(min=0.0)
        return StepTensors(
            new_positions=torch.cat(self._new).cpu(),
            attn=attn,
            last=last,
            edge_pos=edge_pos,
            edge_w=edge_w,
        )
