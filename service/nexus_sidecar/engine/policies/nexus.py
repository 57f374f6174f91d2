"""Nexus scoring (walk + bias-corrected EMA + the last query's reaction), sampled or top-K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from nexus_sidecar.engine.policies.base import (
    Policy,
    ScoreContext,
    Scores,
    normalize,
    prior_weight,
    register,
    standardize,
)
from nexus_sidecar.engine.policies.ema import bias_corrected


def prior_mass(policy: Policy, ctx: ScoreContext, prior: torch.Tensor) -> torch.Tensor:
    """The prior as non-negative walk mass: ``exp(prior_sharpness * (z - max z))``.

    ``z`` is the prior's keep weight standardised over the candidates: a token 2 standard deviations
    more distinctive than the average weighs ``e^(2 * sharpness)`` times more, whatever the prior's
    units (a cosine, a norm). The linear keep weight alone gave a needle only ~1.6x a haystack
    token's mass on the survival streams (needle survival 0.07, no better than attention alone). The offset
    ``max z`` (over candidates) keeps every exponent <= 0 (no overflow); a protected slot weighs at
    most what the most distinctive candidate does.
    """
    z = standardize(prior_weight(policy.cfg.prior, prior), ctx.cand)
    top = torch.where(ctx.cand, z, -torch.inf).amax(dim=1, keepdim=True).clamp(min=-3e38)
    # exp in float64, rounded once: correctly rounded whatever the vector width or the slot's place
    # in the tensor (float32 exp rounds differently in torch's vector body and its scalar tail), so
    # the fused kernels agree bit for bit.
    return torch.exp((z - top).clamp_(max=0.0).mul_(policy.cfg.prior_sharpness).double()).float()


def prior_share(policy: Policy, call: str) -> float:
    """The prior's share of the direct mass for this call: ``question_prior_mix`` on the calls whose
    queries carry what is asked (question, decode) when it is set, else ``prior_mix``."""
    cfg = policy.cfg
    if cfg.question_prior_mix is not None and call in ("question", "decode"):
        return cfg.question_prior_mix
    return cfg.prior_mix


def reacts(policy: Policy, call: str) -> bool:
    """Whether this call's newest query may save a token on its own (see ``PolicyConfig.react_calls``)."""
    return policy.cfg.react_calls == "all" or call != "context"


def personalisation(policy: Policy, ctx: ScoreContext, attn: torch.Tensor) -> torch.Tensor:
    """The walk's direct mass ``d``: attention mixed with the query-agnostic prior.

    ``d = (1 - mix) * attn / sum(attn[cand]) + mix * w / sum(w[cand])`` with ``w`` the
    :func:`prior_mass` and ``mix`` the call's :func:`prior_share`: two distributions over the
    evictable slots, so ``mix`` is the prior's
    share of the candidates' mass whatever the protected slots absorb (sinks take most of the
    attention, and would shrink the candidates' attention share under a normalisation over every
    slot). Without the prior (an old client) or with a share of 0, ``d`` is the attention
    normalised over every valid slot, exactly as before priors existed.
    """
    mix = prior_share(policy, ctx.call)
    prior = ctx.priors.get(policy.cfg.prior)
    if prior is None or mix == 0.0:
        return normalize(attn, ctx.valid)
    w = prior_mass(policy, ctx, prior)
    # Both normalisations folded into one per-row scale each (float64 sums, float32 elementwise).
    scale = [torch.where(t > 0, share / t.clamp(min=1e-300), 0.0).to(attn.dtype)
             for share, t in ((1.0 - mix, _cand_total(attn, ctx)), (mix, _cand_total(w, ctx)))]
    return attn * scale[0] + w * scale[1]


def _cand_total(x: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    return torch.where(ctx.cand, x, 0.0).sum(dim=1, keepdim=True, dtype=torch.float64)


def nexus_scores(policy: Policy, ctx: ScoreContext) -> Scores:
    """Memory = bias-corrected EMA of walk scores; reaction = the last query's row (on the calls
    :func:`reacts` allows; otherwise the weight is the memory alone).

    With ``attn_reduce="mean"`` the direct mass of each slot is first divided by the number of the
    call's queries that could attend to it (see :class:`ScoreContext`), removing the causal bias
    of summed multi-token calls towards older slots.

    The walk starts from :func:`personalisation` (attention mixed with the prior the step carries).
    Each signal is normalised over the candidate slots before the max, because walk scores sum
    to more than one and would otherwise swamp the last row (measured: DESIGN.md section 2).
    """
    gamma = policy.cfg.gamma
    attn = ctx.attn / ctx.observers() if policy.cfg.attn_reduce == "mean" else ctx.attn
    s = ctx.walk(personalisation(policy, ctx, attn))
    memory = gamma * ctx.memory + (1.0 - gamma) * s
    corrected = bias_corrected(memory, ctx.age, gamma)
    remember = normalize(corrected, ctx.cand)
    weight = torch.maximum(remember, normalize(ctx.last, ctx.cand)) if reacts(policy, ctx.call) else remember
    return Scores(weight=weight, memory=torch.where(ctx.valid, memory, 0.0))


@dataclass(frozen=True)
class _Nexus(Policy):
    """What both Nexus variants share: the walk over edges and the prior they mix in."""

    uses_edges: ClassVar[bool] = True

    def reads(self) -> tuple[str, ...]:
        """The configured prior, when it has any weight on some call."""
        return (self.cfg.prior,) if max(self.cfg.prior_mix, self.cfg.question_prior_mix or 0.0) > 0 else ()

    def score(self, ctx: ScoreContext) -> Scores:
        """See :func:`nexus_scores`."""
        return nexus_scores(self, ctx)


@register
@dataclass(frozen=True)
class NexusSampling(_Nexus):
    """Nexus Sampling: Nexus scores, weighted reservoir (A-Res) selection with sharpness tau."""

    name: ClassVar[str] = "nexus"
    sampled: ClassVar[bool] = True
    description: ClassVar[str] = "Nexus Sampling: walk scores + weighted reservoir sampling"


@register
@dataclass(frozen=True)
class NexusTopK(_Nexus):
    """Nexus scoring with deterministic top-K selection (the ablation without sampling)."""

    name: ClassVar[str] = "nexus_topk"
    description: ClassVar[str] = "Nexus scores, deterministic top-K"
