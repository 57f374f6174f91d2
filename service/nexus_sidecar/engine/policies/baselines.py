"""The classic direct-attention policies, run in the same engine and state as Nexus Sampling
so that comparisons share protection rules, pooling and granularity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from nexus_sidecar.engine.policies.base import Policy, ScoreContext, Scores, prior_weight, register, window_mean


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


@register
@dataclass(frozen=True)
class KeyDiff(Policy):
    """KeyDiff (kvpress ``KeyDiffPress``): keep the keys least similar to the group's mean key.

    Needs no attention, so it can keep a token nothing has attended to yet. kvpress scores and
    evicts per head and layer; here the score is averaged over the group's heads and layers (one
    shared eviction set per group, as every policy of this engine).
    """

    name: ClassVar[str] = "keydiff"
    description: ClassVar[str] = "KeyDiff: top-K of key diversity (-cos to the mean key), needs the key_diversity prior"
    requires: ClassVar[tuple[str, ...]] = ("key_diversity",)

    def score(self, ctx: ScoreContext) -> Scores:
        """Weight = (1 + key_diversity) / 2."""
        return Scores(weight=prior_weight("key_diversity", ctx.priors["key_diversity"]), memory=ctx.memory)


@register
@dataclass(frozen=True)
class KNorm(Policy):
    """KNorm (kvpress ``KnormPress``): keep the keys of lowest L2 norm."""

    name: ClassVar[str] = "knorm"
    description: ClassVar[str] = "KNorm: top-K of low key norm, needs the key_norm prior"
    requires: ClassVar[tuple[str, ...]] = ("key_norm",)

    def score(self, ctx: ScoreContext) -> Scores:
        """Weight = 1 / (1 + key_norm)."""
        return Scores(weight=prior_weight("key_norm", ctx.priors["key_norm"]), memory=ctx.memory)
