"""The classic direct-attention policies, run in the same engine and state as Nexus Sampling
so that comparisons share protection rules, pooling and granularity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from nexus_sidecar.engine.policies.base import Policy, ScoreContext, Scores, register, window_mean


@register
@dataclass(frozen=True)
class StreamingLLM(Policy):
    """Attention sinks + a recent window: every unprotected token weighs 0, so the oldest go first."""

    name: ClassVar[str] = "streaming"
    description: ClassVar[str] = "StreamingLLM: keep sinks and the most recent tokens"

    def score(self, ctx: ScoreContext) -> Scores:
        """All-zero weights: top-K ties evict the oldest first."""
        return Scores(weight=torch.zeros_like(ctx.attn), memory=ctx.memory)


@register
@dataclass(frozen=True)
class TOVA(Policy):
    """TOVA: the newest query's attention row alone."""

    name: ClassVar[str] = "tova"
    description: ClassVar[str] = "TOVA: top-K of the last query's attention"

    def score(self, ctx: ScoreContext) -> Scores:
        """Weight = last query's attention."""
        return Scores(weight=ctx.last, memory=ctx.memory)


@register
@dataclass(frozen=True)
class H2O(Policy):
    """H2O: attention accumulated over every call since the token arrived (heavy hitters)."""

    name: ClassVar[str] = "h2o"
    description: ClassVar[str] = "H2O: top-K of accumulated attention"

    def score(self, ctx: ScoreContext) -> Scores:
        """Weight = running sum of attention received."""
        acc = ctx.memory + ctx.attn
        return Scores(weight=acc, memory=acc)


@register
@dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV-style: attention of the observation window (the queries of this call), pooled
    over ``kernel`` neighbours as SnapKV pools its votes."""

    name: ClassVar[str] = "snapkv"
    description: ClassVar[str] = "SnapKV-style: pooled attention of the current observation window"
    kernel: ClassVar[int] = 7

    def score(self, ctx: ScoreContext) -> Scores:
        """Weight = window attention averaged over the live neighbours (in slot order)."""
        return Scores(weight=window_mean(ctx.attn, ctx.valid, self.kernel, ctx.slot_order), memory=ctx.memory)


@register
@dataclass(frozen=True)
class Uniform(Policy):
    """Uniform random eviction among unprotected tokens (reservoir keys with tau = 0)."""

    name: ClassVar[str] = "random"
    sampled: ClassVar[bool] = True
    description: ClassVar[str] = "Uniform random eviction"

    def tau(self) -> float:
        """Always 0: weights play no role."""
        return 0.0

    def score(self, ctx: ScoreContext) -> Scores:
        """Constant weights."""
        return Scores(weight=torch.ones_like(ctx.attn), memory=ctx.memory)
