"""One policy session applied to one KV cache: the step that :func:`~nexus_client.hf.generate` and the
evaluation's settings share.

Between calls, each forward pass's capture is added (:class:`~nexus_client.hf.accumulate.AttentionAccumulator`);
a call sends one summary to the backend, checks the answer against the cache (the keep mask must
cover exactly the cached slots and agree with the evicted positions), cuts the evicted slots out of
every layer (:func:`~nexus_client.hf.cache_surgery.apply_keep_mask`) and out of the caller's slot
lists, and keeps the counts and the time spent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from nexus_client.hf.accumulate import AttentionAccumulator, StepTensors
from nexus_client.hf.backends import PolicyBackend, StepDecision
from nexus_client.hf.cache_surgery import apply_keep_mask
from nexus_client.hf.capture import ForwardCapture
from nexus_client.hf.priors import cache_priors

PRIOR_POLICIES = ("keydiff", "knorm")  # score by a prior alone; Nexus reads one when prior_mix > 0


def reads_priors(config: Mapping[str, Any]) -> bool:
    """Whether the policy of ``config`` reads a query-agnostic prior (so a step should carry them)."""
    policy = str(config.get("policy", "nexus"))
    if policy in PRIOR_POLICIES:
        return True
    if policy in ("nexus", "nexus_topk"):
        # Absent means the engine's default, which mixes the prior in (PolicyConfig.prior_mix > 0).
        mixes = "prior_mix" not in config or float(config["prior_mix"]) > 0.0
        return mixes or float(config.get("question_prior_mix") or 0.0) > 0.0
    return False


class PolicyRun:
    """A backend session for one sequence whose cache holds ``groups`` eviction groups (1 = shared).

    ``window``: the accumulator's observation window (``None``: every pending query's attention).
    ``priors``: send the cache's query-agnostic priors with every call (computed from the cache's
    keys and values right before the call, :func:`~nexus_client.hf.priors.cache_priors`); by default
    they are sent when the policy reads one (``keydiff``, ``knorm``, Nexus with ``prior_mix > 0``).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, backend: PolicyBackend, config: Mapping[str, Any], window: int | None = None,
                 priors: bool | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.config = dict(config)
        self.groups = int(self.config.get("groups", 1))
        self.acc = AttentionAccumulator(self.groups, int(self.config.get("fanout", 8)), window=window)
        self.priors = reads_priors(self.config) if priors is None else priors
        self.session = backend.open(self.config)
        self.calls = 0
        self.evicted = 0
        self.seconds = 0.0  # in the backend
        self.surgery_seconds = 0.0

    def __enter__(self) -> PolicyRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """New tokens added since the last call."""
        return self.acc.pending

    def add(self, capture: ForwardCapture, positions: torch.Tensor, slots: list[torch.Tensor]) -> None:
        """Add one forward pass (``positions`` new tokens; ``slots``: each group's cached positions after it)."""
        self.acc.add(capture, positions, slots)

    def call(self, cache: Any, slots: list[torch.Tensor], kind: str = "unspecified") -> list[list[int]]:
        """One policy call over everything added; evicts from ``cache`` and ``slots`` (in place).

        ``kind`` tells the policy what the added queries are: "context" (a chunk of context, no
        question yet), "question" (a question's queries), "decode" (generated tokens).

        Returns the evicted positions per group. Raises ``RuntimeError`` when the backend's answer
        does not fit the cache (a keep mask over the wrong slots, or one that disagrees with its
        evicted positions): applying it would silently corrupt the cache.
        """
        t0 = time.perf_counter()
        tensors = self.prepare(cache, kind)
        decision = self.backend.step(self.session, tensors)
        self.seconds += time.perf_counter() - t0
        return self.settle(decision, cache, slots)

    def prepare(self, cache: Any, kind: str = "unspecified") -> StepTensors:
        """The summary of everything added since the last call (with the cache's priors when the
        policy reads them); the accumulator starts over. Send it, then hand the answer to
        :meth:`settle` (a worker batching several sequences sends all their summaries in one call)."""
        tensors = self.acc.build()
        tensors.call = kind
        if self.priors:
            width = tensors.attn.shape[-1]
            tensors.priors = {k: v[:, :width].cpu() for k, v in cache_priors(cache, self.groups).items()}
        self.acc.reset()
        return tensors

    def settle(self, decision: StepDecision, cache: Any, slots: list[torch.Tensor]) -> list[list[int]]:
        """Check ``decision`` against the cache, cut the evicted slots out of ``cache`` and ``slots``
        (in place) and count the call; returns the evicted positions per group."""
        t1 = time.perf_counter()
        keep = decision.keep
        if keep.dim() != 2 or keep.shape[0] != self.groups:
            raise RuntimeError(f"backend returned keep of shape {tuple(keep.shape)}, expected [{self.groups}, N]")
        evicted: list[list[int]] = []
        rows = []
        for g in range(self.groups):
            n = slots[g].numel()
            row = keep[g]
            if row.numel() < n or bool(row[n:].any()):
                raise RuntimeError(f"group {g}: keep covers {row.numel()} slots, cache group holds {n}")
            gone = slots[g][~row[:n]]
            if not torch.equal(torch.sort(gone).values, torch.sort(decision.evicted[g].to(torch.int64)).values):
                raise RuntimeError(f"group {g}: keep mask and evicted positions disagree")
            evicted.append(gone.tolist())
            slots[g] = slots[g][row[:n]]
            rows.append(row)
        apply_keep_mask(cache, keep if self.groups > 1 else rows[0])
        self.calls += 1
        self.evicted += sum(len(e) for e in evicted)
        self.surgery_seconds += time.perf_counter() - t1
        return evicted

    def close(self) -> None:
        """Release the backend session."""
        self.backend.close(self.session)
