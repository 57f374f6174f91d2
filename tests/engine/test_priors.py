"""The query-agnostic priors (key diversity, key norm, value norm): what each policy does with them,
what happens without them, and how Nexus mixes them into its walk."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from nexus_sidecar.engine import POLICIES, Engine, InputError, PolicyConfig, StepInput

from tests.engine.streams import Stream, evicted_lists, random_priors, run_checked

PRIOR_FREE = sorted(name for name, cls in POLICIES.items() if not cls.requires)


def _no_edges(g: int, k: int, f: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((g, k, f), -1), torch.zeros(g, k, f)


def _one_call(policy: str, n: int, budget: int, **priors: torch.Tensor) -> list[int]:
    """Evictions of one prefill call of ``n`` tokens (no protection, flat attention)."""
    eng = Engine("cpu")
    h = eng.open(PolicyConfig(policy=policy, budget=budget, sinks=0, recent=0, fanout=1))
    flat = torch.full((1, n), 1.0 / n)
    out = eng.step({h: StepInput(torch.arange(n), flat, flat.clone(), *_no_edges(1, n), **priors)})[h]
    return evicted_lists(out)[0]


def test_keydiff_and_knorm_are_registered() -> None:
    assert POLICIES["keydiff"].requires == ("key_diversity",)
    assert POLICIES["knorm"].requires == ("key_norm",)


def test_keydiff_evicts_the_keys_closest_to_the_mean_key() -> None:
    rng = np.random.default_rng(0)
    kd = torch.from_numpy(rng.permutation(np.linspace(-1.0, 1.0, 40)).astype(np.float32))[None]
    gone = _one_call("keydiff", 40, 30, key_diversity=kd)
    assert sorted(gone) == sorted(torch.argsort(kd[0])[:10].tolist())


def test_knorm_evicts_the_largest_keys() -> None:
    rng = np.random.default_rng(1)
    kn = torch.from_numpy(rng.permutation(np.linspace(0.0, 50.0, 40)).astype(np.float32))[None]
    gone = _one_call("knorm", 40, 30, key_norm=kn)
    assert sorted(gone) == sorted(torch.argsort(kn[0], descending=True)[:10].tolist())


@pytest.mark.parametrize(("policy", "field"), [("keydiff", "key_diversity"), ("knorm", "key_norm")])
def test_a_policy_refuses_a_step_without_its_prior(policy: str, field: str) -> None:
    cfg = PolicyConfig(policy=policy, budget=10, sinks=1, recent=1, groups=2, fanout=3)
    s = Stream.open(Engine("cpu"), cfg, data_seed=4, prefill=14)
    run_checked(s, 3)
    before = s.engine.snapshot(s.handle).to_bytes()
    inp = s.next_input()
    # Every other prior is there: only the one the policy scores by counts.
    setattr(inp, field, None)
    with pytest.raises(InputError) as err:
        s.engine.step({s.handle: inp})
    assert err.value.field == field and policy in err.value.reason
    assert s.engine.snapshot(s.handle).to_bytes() == before


@pytest.mark.parametrize("policy", [p for p in PRIOR_FREE if not p.startswith("nexus")])
def test_policies_without_a_prior_ignore_it(policy: str) -> None:
    # Same stream with and without priors (the priors are drawn last, so the other tensors are equal).
    cfg = PolicyConfig(policy=policy, budget=14, sinks=2, recent=2, groups=2, fanout=3, seed=5, tau=2.0)
    with_p = Stream.open(Engine("cpu"), cfg, data_seed=8, prefill=20)
    without = Stream.open(Engine("cpu"), cfg, data_seed=8, prefill=20, priors=False)
    for _ in range(20):
        inp = with_p.next_input()
        bare = dataclasses.replace(inp, key_diversity=None, key_norm=None, value_norm=None)
        a = with_p.engine.step({with_p.handle: inp})[with_p.handle]
        b = without.engine.step({without.handle: bare})[without.handle]
        with_p.advance(inp)
        without.advance(bare)
        assert evicted_lists(a) == evicted_lists(b)
    assert with_p.engine.snapshot(with_p.handle).to_bytes() == without.engine.snapshot(without.handle).to_bytes()


def _nexus_history(cfg: PolicyConfig, strip: bool) -> tuple[list, bytes]:
    s = Stream.open(Engine("cpu"), cfg, data_seed=12, prefill=24, k_range=(1, 5))
    hist = []
    for _ in range(25):
        inp = s.next_input()
        if strip:
            inp = dataclasses.replace(inp, key_diversity=None, key_norm=None, value_norm=None)
        hist.append(evicted_lists(s.engine.step({s.handle: inp})[s.handle]))
        s.advance(inp)
    return hist, s.engine.snapshot(s.handle).to_bytes()


def _blob_without_prior_knobs(blob: bytes) -> bytes:
    # The snapshot's config differs by the knobs only; compare what the knobs did, not their values.
    from nexus_sidecar.engine import SessionState

    state = SessionState.from_bytes(blob)
    state.config = state.config.with_(prior="key_diversity", prior_mix=0.5, prior_sharpness=1.0)
    return state.to_bytes()


@pytest.mark.parametrize("policy", ["nexus", "nexus_topk"])
def test_nexus_without_priors_or_with_mix_zero_is_the_attention_walk(policy: str) -> None:
    base = PolicyConfig(policy=policy, budget=14, sinks=2, recent=2, groups=2, fanout=3, seed=5, tau=2.0)
    ref_hist, ref_blob = _nexus_history(base, strip=True)
    runs = [
        _nexus_history(base.with_(prior_mix=0.0), strip=False),  # priors sent, mix 0
        _nexus_history(base.with_(prior="value_norm", prior_mix=1.0, prior_sharpness=4.0), strip=True),  # no priors
    ]
    for hist, blob in runs:
        assert hist == ref_hist
        assert _blob_without_prior_knobs(blob) == _blob_without_prior_knobs(ref_blob)
    # ... and the prior does change the outcome when it is sent and mixed in.
    assert _nexus_history(base, strip=False)[0] != ref_hist


def _nexus_cfg(**kw: object) -> PolicyConfig:
    return PolicyConfig(policy="nexus_topk", sinks=1, recent=1, fanout=2, **kw).validate()  # type: ignore[arg-type]


def test_nexus_keeps_a_needle_nothing_attends_to_by_its_prior() -> None:
    # 12 slots; the queries attend to everything but slot 5; slot 5's key is the most distinctive.
    n = 12
    attn = torch.full((1, n), 1.0)
    attn[0, 5] = 0.0
    kd = torch.full((1, n), -0.8)
    kd[0, 5] = 0.9
    kept = {}
    for mix in (0.0, 0.5):
        eng = Engine("cpu")
        h = eng.open(_nexus_cfg(budget=n - 1, beta=0.0, prior_mix=mix))
        out = eng.step({h: StepInput(torch.arange(n), attn, torch.zeros(1, n), *_no_edges(1, n, 2),
                                     key_diversity=kd)})[h]
        kept[mix] = 5 not in evicted_lists(out)[0]
    assert kept == {0.0: False, 0.5: True}


def test_prior_mass_flows_through_the_walk_to_a_bridge() -> None:
    # No attention at all; slot 8 has a distinctive key and an edge to slot 3; slots 3 and 4 have
    # equal, low priors. Without the walk the older slot 3 goes first (ties evict the older slot);
    # with it, slot 3 inherits part of slot 8's prior mass and slot 4 goes instead.
    n = 10
    kd = torch.full((1, n), -0.5)
    kd[0, 8] = 1.0
    kd[0, 3] = kd[0, 4] = -0.9
    edge_pos, edge_w = _no_edges(1, n, 2)
    edge_pos[0, 8, 0], edge_w[0, 8, 0] = 3, 1.0
    gone = {}
    for beta in (0.0, 0.7):
        eng = Engine("cpu")
        h = eng.open(_nexus_cfg(budget=n - 1, beta=beta, prior_mix=1.0))
        out = eng.step({h: StepInput(torch.arange(n), torch.zeros(1, n), torch.zeros(1, n), edge_pos, edge_w,
                                     key_diversity=kd)})[h]
        gone[beta] = evicted_lists(out)[0]
    assert gone == {0.0: [3], 0.7: [4]}


@pytest.mark.parametrize(("prior", "keep_low"), [("key_norm", True), ("value_norm", False)])
def test_nexus_reads_the_configured_prior_in_its_keep_direction(prior: str, keep_low: bool) -> None:
    n = 12
    rng = np.random.default_rng(3)
    priors = random_priors(rng, [0], n)
    eng = Engine("cpu")
    h = eng.open(_nexus_cfg(budget=n - 3, beta=0.0, prior=prior, prior_mix=1.0))
    flat = torch.full((1, n), 1.0)
    gone = evicted_lists(eng.step({h: StepInput(torch.arange(n), flat, torch.zeros(1, n), *_no_edges(1, n, 2),
                                                **priors)})[h])[0]
    x = priors[prior][0, 1 : n - 1]  # the candidates (slot 0 is a sink, slot n - 1 recent)
    expect = torch.argsort(x, descending=keep_low, stable=True)[:3] + 1
    assert sorted(gone) == sorted(expect.tolist())


def test_prior_sharpness_zero_makes_the_prior_uniform() -> None:
    # mix 1, no walk, no reaction: the direct mass is the prior's alone; at sharpness 0 it is flat,
    # so the top-K ties evict the oldest candidates, whatever the prior says.
    n = 12
    kd = torch.linspace(1.0, -1.0, n)[None]  # oldest = most distinctive
    gone = {}
    for sharp in (0.0, 1.0):
        eng = Engine("cpu")
        h = eng.open(_nexus_cfg(budget=n - 3, beta=0.0, prior_mix=1.0, prior_sharpness=sharp))
        out = eng.step({h: StepInput(torch.arange(n), torch.zeros(1, n), torch.zeros(1, n), *_no_edges(1, n, 2),
                                     key_diversity=kd)})[h]
        gone[sharp] = evicted_lists(out)[0]
    assert gone == {0.0: [1, 2, 3], 1.0: [8, 9, 10]}


def test_an_extreme_prior_outlier_stays_finite() -> None:
    # One distinctive key among 3000 identical ones: its z-score is ~55, exp(16 * 55) would overflow.
    n = 3000
    kd = torch.full((1, n), -1.0)
    kd[0, 1500] = 1.0
    eng = Engine("cpu")
    h = eng.open(_nexus_cfg(budget=100, beta=0.5, prior_mix=0.5, prior_sharpness=16.0))
    attn = torch.rand(1, n, generator=torch.Generator().manual_seed(0))
    out = eng.step({h: StepInput(torch.arange(n), attn, attn.clone(), *_no_edges(1, n, 2), key_diversity=kd)})[h]
    assert out.keep[0, 1500] and out.retained == [100]
    assert all(torch.isfinite(m).all() for m in eng.memory(h))
