"""Nexus scoring (walk + bias-corrected EMA + the last query's reaction), sampled or top-K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from nexus_sidecar.engine.policies.base import Policy, ScoreContext, Scores, normalize, register


def nexus_scores(policy: Policy, ctx: ScoreContext) -> Scores:
    """Memory = bias-corrected EMA of walk scores; reaction = the last query's row.

    With ``attn_reduce="mean"`` the direct mass of each slot is first divided by the number of the
    call's queries that could attend to it (see :class:`ScoreContext`), removing the causal bias
    of summed multi-token calls towards older slots.

    Each signal is normalised over the candidate slots before the max, because walk scores sum
    to more than one and would otherwise swamp the last row (measured: DESIGN.md section 2).
    """
    gamma = policy.cfg.gamma
    attn = ctx.attn / ctx.observers() if policy.cfg.attn_reduce == "mean" else ctx.attn
    d = normalize(attn, ctx.valid)
    s = ctx.walk(d)
    memory = gamma * ctx.memory + (1.0 - gamma) * s
    age = (ctx.age + 1).to(memory.dtype)
    corrected = memory / (1.0 - torch.pow(torch.full_like(age, gamma), age))
    remember = normalize(corrected, ctx.cand)
    react = normalize(ctx.last, ctx.cand)
    return Scores(weight=torch.maximum(remember, react), memory=torch.where(ctx.valid, memory, 0.0))


@register
@dataclass(frozen=True)
class NexusSampling(Policy):
    """Nexus Sampling: Nexus scores, weighted reservoir (A-Res) selection with sharpness tau."""

    name: ClassVar[str] = "nexus"
    sampled: ClassVar[bool] = True
    uses_edges: ClassVar[bool] = True
    description: ClassVar[str] = "Nexus Sampling: walk scores + weighted reservoir sampling"

    def score(self, ctx: ScoreContext) -> Scores:
        """See :func:`nexus_scores`."""
        return nexus_scores(self, ctx)


@register
@dataclass(frozen=True)
class NexusTopK(Policy):
    """Nexus scoring with deterministic top-K selection (the ablation without sampling)."""

    name: ClassVar[str] = "nexus_topk"
    uses_edges: ClassVar[bool] = True
    description: ClassVar[str] = "Nexus scores, deterministic top-K"

    def score(self, ctx: ScoreContext) -> Scores:
        """See :func:`nexus_scores`."""
        return nexus_scores(self, ctx)
