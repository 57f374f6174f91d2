"""The Nexus walk, observed through the public engine: with gamma = 0 the policy memory of a
slot after a call is exactly its walk score s_R (``m = gamma m + (1 - gamma) s``), and
``Engine.memory`` exposes it. So these tests do not depend on the walk's internal signature.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nexus_sidecar.engine import Engine, PolicyConfig, StepInput

# A planted graph over positions 0..11: the queries attend heavily to hubs 7 and 9; both hubs, when
# they were queries, attended strongly to the bridge B = 5. B itself gets ~no direct attention.
# Everything else is noise with weak, random edges.
W, F, BRIDGE, HUBS = 12, 3, 5, (7, 9)


def _planted(eps: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    attn = rng.uniform(0.01, 0.03, W).astype(np.float32)
    attn[list(HUBS)] = (1.0, 0.5)
    attn[BRIDGE] = eps
    edge_pos = np.full((W, F), -1, dtype=np.int64)
    edge_w = np.zeros((W, F), dtype=np.float32)
    for j in range(1, W):
        tgt = rng.choice(j, size=min(F - 1, j), replace=False)
        edge_pos[j, 1 : 1 + len(tgt)] = tgt
        edge_w[j, 1 : 1 + len(tgt)] = 0.01
    for hub, w in zip(HUBS, (0.8, 0.6), strict=True):
        edge_pos[hub, 0], edge_w[hub, 0] = BRIDGE, w
    return attn, edge_pos, edge_w


def _walk_scores(attn: np.ndarray, edge_pos: np.ndarray, edge_w: np.ndarray, beta: float, iterations: int,
                 policy: str = "nexus_topk") -> np.ndarray:
    """Memory after one call that carries every token (nothing evicted, gamma = 0) = s_R."""
    n = len(attn)
    cfg = PolicyConfig(policy=policy, budget=n, sinks=0, recent=0, fanout=edge_pos.shape[1], beta=beta,
                       iterations=iterations, gamma=0.0)
    eng = Engine("cpu")
    h = eng.open(cfg)
    a = torch.from_numpy(attn)[None]
    eng.step({h: StepInput(torch.arange(n), a, a.clone(), torch.from_numpy(edge_pos)[None],
                           torch.from_numpy(edge_w)[None])})
    return eng.memory(h)[0].numpy()


def _direct(attn: np.ndarray) -> np.ndarray:
    # d = attn / sum(attn): the float64 sum of a dozen float32 values of similar magnitude is exact
    # in any order, so this is bit-identical to any correct implementation.
    return (attn.astype(np.float64) / attn.astype(np.float64).sum()).astype(np.float32)


@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
def test_bridge_gains_mass(iterations: int) -> None:
    attn, ep, ew = _planted()
    d = _direct(attn)
    s = _walk_scores(attn, ep, ew, beta=0.5, iterations=iterations)
    noise = [i for i in range(W) if i not in (*HUBS, BRIDGE)]
    assert d[BRIDGE] < d[noise].min(), "(planted: the bridge has the least direct attention)"
    assert s[BRIDGE] > 50 * d[BRIDGE], "the bridge must gain far more than its direct mass"
    assert s[BRIDGE] > s[noise].max(), "the bridge must outrank every noise token"
    assert (s >= d - 1e-7).all(), "the walk only adds mass"
    if iterations == 1:  # s_1 = d + beta W^T d, by hand
        expect = d.astype(np.float64)
        for j in range(W):
            for f in range(F):
                if ep[j, f] >= 0:
                    expect[ep[j, f]] += 0.5 * d[j] * ew[j, f]
        assert np.allclose(s, expect, rtol=1e-6, atol=1e-9)


def test_more_beta_more_bridge_mass() -> None:
    attn, ep, ew = _planted()
    vals = [float(_walk_scores(attn, ep, ew, beta=b, iterations=2)[BRIDGE]) for b in (0.1, 0.3, 0.6, 0.9)]
    assert vals == sorted(vals) and vals[0] < vals[-1]


@pytest.mark.parametrize("policy", ["nexus", "nexus_topk"])
@pytest.mark.parametrize(("beta", "iterations"), [(0.0, 2), (0.5, 0), (0.0, 0)])
def test_no_walk_gives_d_exactly(policy: str, beta: float, iterations: int) -> None:
    attn, ep, ew = _planted()
    s = _walk_scores(attn, ep, ew, beta=beta, iterations=iterations, policy=policy)
    assert np.array_equal(s, _direct(attn))


def test_nexus_keeps_the_bridge_where_direct_attention_drops_it() -> None:
    # One call with the planted graph, keeping 5 of 12: with the walk (beta = 0.9) the bridge
    # survives; without it (beta = 0) it has the least weight and is the first to go.
    attn, ep, ew = _planted()
    a = torch.from_numpy(attn)[None]
    kept = {}
    for beta in (0.0, 0.9):
        cfg = PolicyConfig(policy="nexus_topk", budget=5, sinks=0, recent=1, fanout=F, beta=beta, iterations=2)
        eng = Engine("cpu")
        h = eng.open(cfg)
        eng.step({h: StepInput(torch.arange(W), a, a.clone(), torch.from_numpy(ep)[None],
                               torch.from_numpy(ew)[None])})
        kept[beta] = eng.positions(h)[0].tolist()
    assert BRIDGE not in kept[0.0]
    assert BRIDGE in kept[0.9]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), beta=st.floats(0.05, 0.95), iterations=st.integers(1, 4))
def test_walk_matches_dense_recurrence_and_drops_evicted_targets(seed: int, beta: float, iterations: int) -> None:
    # Call 1: n1 tokens with random backward edges; the top-K policy evicts down to the budget.
    # Call 2: k2 new tokens (within the slack, so nothing goes). After call 2 the memory of every
    # retained slot is s_R of the walk over the retained graph, where edges recorded in call 1
    # towards now-evicted tokens are dropped. Compare with a dense float64 recurrence.
    rng = np.random.default_rng(seed)
    n1, k2, budget, fan = int(rng.integers(10, 18)), int(rng.integers(1, 5)), 5, 3
    cfg = PolicyConfig(policy="nexus_topk", budget=budget, slack=4, sinks=0, recent=0, fanout=fan, beta=beta,
                       iterations=iterations, gamma=0.0)
    eng = Engine("cpu")
    h = eng.open(cfg)
    edges: dict[int, list[tuple[int, float]]] = {}

    def call(new: np.ndarray, retained: list[int]) -> None:
        k, width = len(new), len(retained) + len(new)
        ep = np.full((1, k, fan), -1, dtype=np.int64)
        ew = np.zeros((1, k, fan), dtype=np.float32)
        for j, p in enumerate(new):
            visible = np.array(retained + new[: j + 1].tolist())
            f = int(rng.integers(0, min(fan, len(visible)) + 1))
            tgt = rng.choice(visible, size=f, replace=False)
            w = rng.random(f).astype(np.float32)
            ep[0, j, :f], ew[0, j, :f] = tgt, w
            edges[int(p)] = list(zip(tgt.tolist(), w.tolist(), strict=True))
        attn = rng.random((1, width)).astype(np.float32)
        eng.step({h: StepInput(torch.from_numpy(new), torch.from_numpy(attn), torch.from_numpy(attn.copy()),
                               torch.from_numpy(ep), torch.from_numpy(ew))})
        call.attn = attn[0]  # type: ignore[attr-defined]

    call(np.arange(n1), [])
    retained = eng.positions(h)[0].tolist()
    assert len(retained) == budget
    call(np.arange(n1, n1 + k2), retained)
    slots = eng.positions(h)[0].tolist()
    assert slots == retained + list(range(n1, n1 + k2))
    attn = call.attn.astype(np.float64)  # type: ignore[attr-defined]
    d = attn / attn.sum()
    index = {p: i for i, p in enumerate(slots)}
    dense = np.zeros((len(slots), len(slots)))
    for p in slots:
        for t, w in edges[p]:
            if t in index:  # edges to evicted tokens are dropped
                dense[index[p], index[t]] += w
    s = d.copy()
    for _ in range(iterations):
        s = d + beta * dense.T @ s
    assert np.allclose(eng.memory(h)[0].numpy(), s, rtol=2e-5, atol=1e-7)
