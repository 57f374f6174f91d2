"""The survival benchmark's generator: needles nothing attends to until their question, the topic
shift, the priors, and that the stationary scenario is unchanged by them."""

from __future__ import annotations

import torch
from nexus_sidecar.bench.streams import (
    NEEDLE,
    NOISE,
    SINK,
    STRONG,
    StreamSpec,
    attention_rows,
    plant_kinds,
    scenario,
    stream_priors,
)
from nexus_sidecar.bench.survival import SurvivalSettings, run_stream
from nexus_sidecar.engine import PolicyConfig


def test_stationary_plants_no_needles_and_draws_what_it_did() -> None:
    for seed in range(3):
        kind, hub = plant_kinds(scenario("stationary", 512), seed)
        ref_kind, ref_hub = plant_kinds(StreamSpec(length=512), seed)
        assert torch.equal(kind, ref_kind) and torch.equal(hub, ref_hub)
        assert not (kind == NEEDLE).any()
    needle_kind, _ = plant_kinds(scenario("needle", 512), 0)
    assert (needle_kind == NEEDLE).sum() > 0
    # Needles replace noise only: the other kinds are where they were.
    other = needle_kind != NEEDLE
    assert torch.equal(needle_kind[other], plant_kinds(StreamSpec(length=512), 0)[0][other])


def _mean_row(spec: StreamSpec, kind: torch.Tensor, hub: torch.Tensor, query: int) -> torch.Tensor:
    slots = torch.arange(query + 1)
    rows = attention_rows(slots, torch.full((400,), query), kind, hub, torch.Generator().manual_seed(1), spec)
    return rows.mean(0)


def _row(spec: StreamSpec, kind: torch.Tensor, hub: torch.Tensor, query: int) -> torch.Tensor:
    slots = torch.arange(query + 1)
    return attention_rows(slots, torch.tensor([query]), kind, hub, torch.Generator().manual_seed(1), spec)[0]


def test_a_needle_is_ignored_until_its_question_then_found() -> None:
    spec = scenario("needle", 512)
    kind, hub = plant_kinds(spec, 2)
    needles = torch.nonzero(kind == NEEDLE).flatten()
    noise = torch.nonzero(kind[: spec.question_start - 32] == NOISE).flatten()
    before = _mean_row(spec, kind, hub, spec.question_start - 1)
    asking = _mean_row(spec, kind, hub, spec.question_start)
    assert before[needles].mean() < 0.05 * before[noise].mean()
    assert asking[needles].mean() > 50 * asking[noise].mean()


def test_the_topic_shift_fades_the_old_topic_but_not_sinks_or_needles() -> None:
    spec = scenario("needle", 512)
    kind, hub = plant_kinds(spec, 3)
    cut = spec.shift_at
    assert cut is not None
    plain = StreamSpec(length=512)  # same kinds, no shift, no question
    q = cut + 20
    shifted, unshifted = _row(spec, kind, hub, q), _row(plain, kind, hub, q)
    old_strong = torch.nonzero((kind == STRONG) & (torch.arange(512) < cut - 8)).flatten()
    new_strong = torch.nonzero((kind == STRONG) & (torch.arange(512) >= cut) & (torch.arange(512) < q - 8)).flatten()
    sinks = torch.nonzero(kind == SINK).flatten()
    # One query row: every slot's attention is scaled by the same renormalisation c, times 0.1 if faded.
    c = shifted[sinks] / unshifted[sinks]
    assert torch.allclose(shifted[new_strong] / unshifted[new_strong], c[0].expand(len(new_strong)))
    assert torch.allclose(shifted[old_strong] / unshifted[old_strong], 0.1 * c[0].expand(len(old_strong)))


def test_needle_keys_are_more_distinctive() -> None:
    kind, _ = plant_kinds(scenario("needle", 1024), 4)
    kd = stream_priors(kind, 4)["key_diversity"]
    assert kd[kind == NEEDLE].mean() > kd[kind == NOISE].mean() + 0.2
    assert (kd >= -1).all() and (kd <= 1).all()


def test_needle_streams_reward_the_prior() -> None:
    spec = scenario("needle", 384)
    settings = SurvivalSettings(length=384, scenario="needle")
    assert settings.spec() == spec and "keydiff" in settings.all_policies()
    assert "keydiff" not in SurvivalSettings(length=384).all_policies()

    def needles(policy: str, **kw: object) -> float:
        cfg = PolicyConfig(policy=policy, budget=77, **kw).validate()  # type: ignore[arg-type]
        per_seed = run_stream(cfg, spec, range(3), every=4)
        values = [r["needle"] for r in per_seed if r["needle"] is not None]
        return sum(values) / len(values)

    attention_only = needles("nexus", prior_mix=0.0)
    assert needles("keydiff") > attention_only + 0.3
    assert needles("nexus") > attention_only + 0.2
    assert needles("tova") < 0.1
