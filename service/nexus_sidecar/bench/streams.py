"""Synthetic attention streams with planted token kinds (the survival benchmark's generator).

Every position gets a kind; the attention a query pays a cached token i is
``level[kind_i] * exp(sigma[kind_i] * z)`` (z ~ N(0, 1) drawn afresh for every query), times 3
for the 8 most recent tokens (local attention), normalised over the tokens the query can see in
the cache (softmax over the cache, so evicting tokens shifts mass to the rest). Kinds:

* ``sink``    the first 4 positions, level 30 (attention sinks);
* ``noise``   level 1, sigma 0.5 (median 1, mean 1.13);
* ``strong``  level 4, sigma 0.5: every policy should keep them;
* ``subtle``  level 1, sigma 1.0: the same median as noise, a 1.46x higher mean and high
              variance, so any single step can put them below the cut (only memory finds them);
* ``bridge``  level 0.5: *less* direct attention than noise; two ``hub`` tokens (strong, level
              4) arrive 4-12 positions later and attend to their bridge 200x more than to a
              noise token (their edges carry it), so the bridge matters only through the hubs;
* ``needle``  level 0.02: nothing attends to it until its question, the last ``questions``
              positions of the stream, which pay it 5000x its level (~100x a noise token), as a
              pass key is ignored until it is asked for. Its key is distinctive: its key diversity
              prior is drawn ~2 standard deviations above the other tokens' (see :func:`stream_priors`).

A **topic shift** (``shift``, a fraction of the stream) multiplies the attention every query after
it pays the tokens before it by 0.1 (sinks and needles excepted): the old topic fades, its strong
tokens become stale. ``stationary`` (the default) has neither needles nor a shift nor priors; the
``needle`` scenario has all three (``SCENARIOS``).

Queries' own rows give their outgoing edges (top-F). Everything is seeded per session.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

KINDS = ("noise", "sink", "strong", "subtle", "bridge", "hub", "needle")
NOISE, SINK, STRONG, SUBTLE, BRIDGE, HUB, NEEDLE = range(7)
LEVEL = torch.tensor([1.0, 30.0, 4.0, 1.0, 0.5, 4.0, 0.02])
SIGMA = torch.tensor([0.5, 0.2, 0.5, 1.0, 0.5, 0.5, 0.5])
RECENT_BOOST, RECENT_SPAN, HUB_BOOST = 3.0, 8, 200.0
QUESTION_BOOST, SHIFT_DECAY = 5000.0, 0.1
# Key diversity prior per kind: mean and spread (clipped to [-1, 1]); the norms carry no signal.
KD_MEAN, KD_NEEDLE_MEAN, KD_SINK_MEAN, KD_SD = -0.5, -0.2, 0.3, 0.15


@dataclass
class StreamSpec:
    """Shape of one synthetic stream."""

    length: int = 1024
    sinks: int = 4
    p_strong: float = 0.03
    p_subtle: float = 0.05
    p_bridge: float = 0.03
    p_needle: float = 0.0
    questions: int = 0  # the last `questions` positions ask for the needles
    shift: float | None = None  # where the topic shifts, as a fraction of the stream
    priors: bool = False  # send the query-agnostic priors (stream_priors)

    @property
    def question_start(self) -> int:
        """First position of the question (``length`` when there is none)."""
        return self.length - self.questions

    @property
    def shift_at(self) -> int | None:
        """First position after the topic shift (None: no shift)."""
        return None if self.shift is None else round(self.shift * self.length)


# Named generator settings (`nexus-sidecar bench survival --scenario NAME`); the length is set per run.
SCENARIOS: dict[str, StreamSpec] = {
    "stationary": StreamSpec(),
    "needle": StreamSpec(p_needle=0.01, questions=16, shift=0.5, priors=True),
}


def scenario(name: str, length: int) -> StreamSpec:
    """The named scenario's spec at ``length`` tokens."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {sorted(SCENARIOS)}")
    return replace(SCENARIOS[name], length=length)


def plant_kinds(spec: StreamSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kinds per position and, per position, the bridge it is a hub of (-1 if none)."""
    g = torch.Generator().manual_seed(seed)
    T = spec.length
    r = torch.rand(T, generator=g)
    kind = torch.full((T,), NOISE, dtype=torch.int64)
    kind[r < spec.p_strong + spec.p_subtle + spec.p_bridge] = BRIDGE
    kind[r < spec.p_strong + spec.p_subtle] = SUBTLE
    kind[r < spec.p_strong] = STRONG
    kind[: spec.sinks] = SINK
    kind[T - 32 :][kind[T - 32 :] == BRIDGE] = NOISE  # a bridge needs room for its hubs
    hub_of = torch.full((T,), -1, dtype=torch.int64)
    for b in torch.nonzero(kind == BRIDGE).flatten().tolist():
        offsets = torch.randperm(9, generator=g)[:2] + 4
        for h in (b + offsets).tolist():
            if kind[h] in (NOISE, SUBTLE, STRONG) and hub_of[h] < 0:
                kind[h], hub_of[h] = HUB, b
    if spec.p_needle > 0:  # drawn last: without needles a seed plants exactly what it did before
        r = torch.rand(T, generator=g)
        pos = torch.arange(T)
        room = (pos >= spec.sinks) & (pos < spec.question_start - 32)  # not in the question or recent window
        kind[(r < spec.p_needle) & room & (kind == NOISE)] = NEEDLE
    return kind, hub_of


def stream_priors(kind: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Per-position priors [T] (a token's key is fixed for life): a needle's key diversity is
    drawn ``(KD_NEEDLE_MEAN - KD_MEAN) / KD_SD = 2`` standard deviations above the others', an
    informative but noisy signal; key and value norms are the same distribution for every kind."""
    g = torch.Generator().manual_seed(20_000 + seed)
    T = kind.shape[0]
    mean = torch.full((T,), KD_MEAN)
    mean[kind == NEEDLE] = KD_NEEDLE_MEAN
    mean[kind == SINK] = KD_SINK_MEAN
    return {
        "key_diversity": (mean + KD_SD * torch.randn(T, generator=g)).clamp(-1.0, 1.0),
        "key_norm": (10.0 + 2.0 * torch.randn(T, generator=g)).clamp(min=0.0),
        "value_norm": (1.0 + 0.3 * torch.randn(T, generator=g)).abs(),
    }


def attention_rows(
    slot_pos: torch.Tensor, query_pos: torch.Tensor, kind: torch.Tensor, hub_of: torch.Tensor, g: torch.Generator,
    spec: StreamSpec | None = None,
) -> torch.Tensor:
    """Attention rows of the queries over the slots: [Q, W] (causal, normalised).

    ``slot_pos`` [W] (padding -1 is masked), ``query_pos`` [Q]; ``spec`` brings the question and
    the topic shift (None: neither).
    """
    valid = slot_pos >= 0
    sp = slot_pos.clamp(min=0)
    k = kind[sp]
    z = torch.randn(query_pos.shape[0], slot_pos.shape[0], generator=g)
    x = LEVEL[k] * torch.exp(SIGMA[k] * z)
    dist = query_pos.unsqueeze(1) - sp.unsqueeze(0)
    x = torch.where((dist >= 0) & (dist < RECENT_SPAN), x * RECENT_BOOST, x)
    target = hub_of[query_pos].unsqueeze(1)
    x = torch.where((target >= 0) & (sp.unsqueeze(0) == target), x * HUB_BOOST, x)
    if spec is not None and spec.questions:
        asks = (query_pos >= spec.question_start).unsqueeze(1)
        x = torch.where(asks & (k == NEEDLE).unsqueeze(0), x * QUESTION_BOOST, x)
    if spec is not None and spec.shift_at is not None:
        stale = ((sp < spec.shift_at) & (k != SINK) & (k != NEEDLE)).unsqueeze(0)
        x = torch.where((query_pos >= spec.shift_at).unsqueeze(1) & stale, x * SHIFT_DECAY, x)
    x = torch.where(valid.unsqueeze(0) & (dist >= 0), x, torch.zeros_like(x))
    return x / x.sum(1, keepdim=True)
