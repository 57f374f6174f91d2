"""Selection: reservoir statistics (A-Res), the tau limits, protection, pooling and blocks, called
directly on ``nexus_sidecar.engine.selection.select``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nexus_sidecar.engine.selection import select, span_pool


def _select(weight: torch.Tensor, budget: int | list[int], *, tau: float | None, seeds: torch.Tensor | None = None,
            protected: torch.Tensor | None = None, n: list[int] | None = None, slack: int = 0, pool: int = 1,
            block_size: int | None = None, slot_pos: torch.Tensor | None = None, call: int = 0,
            pool_reduce: str = "max") -> torch.Tensor:
    rows, width = weight.shape
    n_t = torch.tensor(n if n is not None else [width] * rows, dtype=torch.int64)
    valid = torch.arange(width)[None, :] < n_t[:, None]
    if slot_pos is None:
        slot_pos = torch.where(valid, torch.arange(width).expand(rows, width), torch.iinfo(torch.int64).max)
    b = torch.tensor(budget if isinstance(budget, list) else [budget] * rows, dtype=torch.int64)
    sel = select(
        weight, valid, protected if protected is not None else torch.zeros_like(valid), slot_pos, n_t, b,
        torch.full((rows,), slack, dtype=torch.int64),
        seeds if seeds is not None else torch.zeros(rows, dtype=torch.int64),
        torch.zeros(rows, dtype=torch.int64), torch.full((rows,), call, dtype=torch.int64),
        tau=tau, pool=pool, block_size=block_size, pool_reduce=pool_reduce,
    )
    assert not (sel.evict & ~valid).any()
    return sel.evict


# -- A-Res statistics --------------------------------------------------------------------------------
ROWS, N, BUDGET = 20_000, 8, 3


def _exact_inclusion(p: np.ndarray, size: int) -> np.ndarray:
    """Inclusion probabilities of successive sampling without replacement proportional to p
    (enumerating all ordered draws): what A-Res keys reproduce."""
    incl = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), size):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        incl[list(seq)] += prob
    return incl


def _numpy_inclusion(p: np.ndarray, size: int, draws: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(p))
    for _ in range(draws):
        counts[rng.choice(len(p), size=size, replace=False, p=p)] += 1
    return counts / draws


@pytest.mark.parametrize(("tau", "base"), [(1.0, [1, 2, 3, 4, 5, 6, 7, 8]), (2.0, [1, 1.5, 2, 3, 3.5, 5, 6, 8]),
                                           (0.5, [0.1, 1, 1, 2, 4, 4, 9, 30])])
def test_reservoir_inclusion_matches_successive_sampling(tau: float, base: list[float]) -> None:
    w = torch.tensor(base, dtype=torch.float32) / 7.0  # any scale: keys use w / max w
    weight = w.expand(ROWS, N).clone()
    seeds = torch.arange(ROWS, dtype=torch.int64) * 7919 + 12345  # fixed seeds, one row each
    keep = ~_select(weight, BUDGET, tau=tau, seeds=seeds)
    assert (keep.sum(1) == BUDGET).all()
    engine_freq = keep.double().mean(0).numpy()

    p = np.asarray(base, dtype=np.float64) ** tau
    p /= p.sum()
    exact = _exact_inclusion(p, BUDGET)
    numpy_freq = _numpy_inclusion(p, BUDGET, ROWS, seed=2024)
    assert abs(exact.sum() - BUDGET) < 1e-9
    # One frequency from 20k samples has sigma <= sqrt(0.25 / 20000) = 0.0035, so 0.015 is > 4 sigma
    # against the exact values; engine vs numpy (two estimates) has sigma <= 0.005, so 0.02 is 4 sigma.
    assert np.abs(engine_freq - exact).max() < 0.015, (engine_freq, exact)
    assert np.abs(numpy_freq - exact).max() < 0.015, (numpy_freq, exact)  # the reference itself
    assert np.abs(engine_freq - numpy_freq).max() < 0.02, (engine_freq, numpy_freq)
    # And it is not uniform: the heaviest slot is kept clearly more often than the lightest.
    assert engine_freq[-1] - engine_freq[0] > 0.2


def test_tau_zero_is_uniform_whatever_the_weights() -> None:
    w = torch.tensor([1e-6, 1, 1, 5, 100, 0.0, 3, 1e3])
    keep = ~_select(w.expand(ROWS, N).clone(), BUDGET, tau=0.0, seeds=torch.arange(ROWS) * 31 + 5)
    freq = keep.double().mean(0).numpy()
    # sigma = sqrt(3/8 * 5/8 / 20000) = 0.0034; 0.015 is 4.4 sigma.
    assert np.abs(freq - BUDGET / N).max() < 0.015, freq


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), width=st.integers(2, 40), data=st.data())
def test_huge_tau_is_exact_top_k(seed: int, width: int, data: st.DataObject) -> None:
    # Distinct weights with relative gaps >= 1e-3: tau = 1e6 turns a gap into a key difference
    # >= 1e6 * log(1.001) ~ 1000, far above the spread of the Gumbel noise (-log(-log u) lies in
    # [-3.6, 36.8] for 53-bit u), so the sampled keys order exactly like the weights.
    budget = data.draw(st.integers(1, width))
    rng = np.random.default_rng(seed)
    rows = 16
    ranks = np.stack([rng.permutation(width) for _ in range(rows)])
    w = torch.from_numpy((1.002 ** ranks) * rng.uniform(0.01, 10, size=(rows, 1))).to(torch.float32)
    seeds = torch.from_numpy(rng.integers(-(2**62), 2**62, size=rows))
    big = _select(w, budget, tau=1e6, seeds=seeds)
    top = _select(w, budget, tau=None)
    inf = _select(w, budget, tau=float("inf"), seeds=seeds)
    assert torch.equal(big, top) and torch.equal(inf, top)
    # top-K evicts exactly the (width - budget) smallest weights.
    expect = torch.from_numpy(ranks < width - budget)
    assert torch.equal(top, expect)


def test_top_k_ties_evict_the_older_slot_first() -> None:
    w = torch.tensor([[0.5, 0.2, 0.2, 0.9, 0.2, 0.2]])
    assert _select(w, 3, tau=None).tolist() == [[False, True, True, False, True, False]]


# -- budget, slack, protection ------------------------------------------------------------------------
def test_nothing_evicted_up_to_budget_plus_slack() -> None:
    w = torch.rand(4, 10)
    assert not _select(w, 7, tau=1.0, slack=3).any()
    ev = _select(w, 7, tau=1.0, slack=2)  # 10 > 9: evict down to the budget, not budget + slack
    assert (ev.sum(1) == 3).all()


@pytest.mark.parametrize("tau", [None, 0.0, 1.0, 8.0])
def test_protected_slots_never_evicted_even_at_zero_weight(tau: float | None) -> None:
    rows, width = 200, 12
    w = torch.rand(rows, width)
    protected = torch.zeros(rows, width, dtype=torch.bool)
    protected[:, :2] = True
    protected[:, -3:] = True
    w[protected] = 0.0
    ev = _select(w, 7, tau=tau, protected=protected, seeds=torch.arange(rows), pool=3)
    assert not (ev & protected).any()
    assert (ev.sum(1) == width - 7).all()


def test_rows_are_independent_of_padding_and_neighbours() -> None:
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.random((3, 20))).float()
    n = [20, 9, 14]
    alone = [_select(w[i : i + 1, : n[i]], [6, 4, 10][i], tau=2.0, seeds=torch.tensor([i + 1]), call=4)
             for i in range(3)]
    padded = w.clone()
    padded[1, 9:] = 5.0  # garbage in padding must not matter
    together = _select(padded, [6, 4, 10], tau=2.0, seeds=torch.tensor([1, 2, 3]), n=n, call=4)
    for i in range(3):
        assert torch.equal(together[i, : n[i]], alone[i][0])


def test_seed_group_and_call_change_the_draw() -> None:
    w = torch.ones(1, 30)
    base = _select(w, 10, tau=1.0, seeds=torch.tensor([5]))
    assert torch.equal(base, _select(w, 10, tau=1.0, seeds=torch.tensor([5])))
    # 20 of 30 evicted uniformly: two independent draws agree with probability 1 / C(30, 10) ~ 3e-8.
    assert not torch.equal(base, _select(w, 10, tau=1.0, seeds=torch.tensor([6])))
    assert not torch.equal(base, _select(w, 10, tau=1.0, seeds=torch.tensor([5]), call=1))


# -- pooling ----------------------------------------------------------------------------------------
def test_span_pool_spreads_to_neighbours_but_not_from_protected() -> None:
    w = torch.tensor([[100.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0]])
    cand = torch.tensor([[False, True, True, True, True, True, True]])
    pooled = span_pool(w, cand, 3)
    assert pooled.tolist() == [[0.0, 0.0, 7.0, 7.0, 7.0, 0.0, 0.0]]
    assert torch.equal(span_pool(w, cand, 1), torch.where(cand, w, 0.0))


def test_span_pool_mean_averages_over_evictable_neighbours_only() -> None:
    w = torch.tensor([[100.0, 3.0, 0.0, 6.0, 0.0, 0.0, 9.0]])
    cand = torch.tensor([[False, True, True, True, True, True, True]])
    pooled = span_pool(w, cand, 3, reduce="mean")
    # Slot 1's window holds the protected sink (not counted) and slots 1-2: (3 + 0) / 2.
    # The last slot's window is clipped: (0 + 9) / 2.
    assert pooled.tolist() == [[0.0, 1.5, 3.0, 2.0, 2.0, 3.0, 4.5]]
    assert torch.equal(span_pool(w, cand, 1, reduce="mean"), torch.where(cand, w, 0.0))


def test_mean_pooling_prefers_a_region_attended_throughout_over_a_lone_peak() -> None:
    # A lone peak (slot 1) vs a uniformly attended 3-token span (slots 5-7): max-pooling keeps the
    # peak's neighbourhood, mean-pooling keeps the span (SnapKV's smoothing).
    w = torch.tensor([[0.0, 0.0, 0.6, 0.0, 0.0, 0.0, 0.4, 0.4, 0.4, 0.0, 0.0]])
    by_max = _select(w, 3, tau=None, pool=3).tolist()[0]
    by_mean = _select(w, 3, tau=None, pool=3, pool_reduce="mean").tolist()[0]
    assert [i for i, e in enumerate(by_max) if not e] == [1, 2, 3]
    assert [i for i, e in enumerate(by_mean) if not e] == [6, 7, 8]


def test_pooling_keeps_a_multi_token_entity_together() -> None:
    # One strong digit among weak ones: without pooling its neighbours go, with pool=3 they stay.
    w = torch.tensor([[0.3, 0.01, 0.02, 0.9, 0.015, 0.3, 0.25, 0.2]])
    assert _select(w, 5, tau=None).tolist()[0] == [False, True, True, False, True, False, False, False]
    pooled = _select(w, 5, tau=None, pool=3).tolist()[0]
    assert pooled[2] is False and pooled[4] is False  # the neighbours of the 0.9 survive
    assert sum(pooled) == 3


# -- blocks --------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), bs=st.sampled_from([2, 3, 4, 8]), tau=st.sampled_from([None, 0.0, 1.0, 3.0]))
def test_block_mode_evicts_whole_blocks_and_respects_protection(seed: int, bs: int, tau: float | None) -> None:
    rng = np.random.default_rng(seed)
    rows, width = 8, 40
    # Ascending positions with holes (a retained cache after earlier block evictions).
    pos = np.sort(rng.choice(200, size=(rows, width), replace=True), axis=1)
    pos = np.maximum.accumulate(pos + np.arange(width)[None, :], axis=1)  # strictly ascending
    slot_pos = torch.from_numpy(pos)
    w = torch.from_numpy(rng.random((rows, width))).float()
    protected = torch.zeros(rows, width, dtype=torch.bool)
    protected[:, :2] = True
    protected[:, -3:] = True
    budgets = rng.integers(20, 30, size=rows).tolist()
    ev = _select(w, budgets, tau=tau, block_size=bs, slot_pos=slot_pos, protected=protected,
                 seeds=torch.arange(rows))
    for r in range(rows):
        blocks = pos[r] // bs
        gone = set(blocks[ev[r].numpy()])
        kept = set(blocks[~ev[r].numpy()])
        assert not gone & kept, "a block was split"
        assert not gone & set(blocks[protected[r].numpy()]), "a protected slot's block was evicted"
        left = width - int(ev[r].sum())
        assert left <= budgets[r] and left > budgets[r] - bs


def test_block_weight_is_the_max_of_its_slots() -> None:
    # Blocks of 2: {0,1} max .9, {2,3} max .5, {4,5} max .3, {6,7} max .8 -> evict block {4,5}.
    w = torch.tensor([[0.0, 0.9, 0.4, 0.5, 0.3, 0.3, 0.8, 0.0]])
    assert _select(w, 6, tau=None, block_size=2).tolist()[0] == [False] * 4 + [True] * 2 + [False] * 2
