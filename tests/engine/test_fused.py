"""The fused CPU kernels against the pure-torch reference (``NEXUS_ENGINE_KERNELS=fused`` vs ``torch``).

Stated tolerance: selections (keep masks, evicted positions and ages, slot order, counts) and every
integer or bool state must agree exactly on every call; float outputs (retained mass, the policy
memory in the snapshot, Nexus weights) within a relative 1e-6 (1e-5 for memory after many calls).
The kernels use the reference's float operations in the same order; only the float64 row sums
differ in summation order, which moves a float32 result by one ulp in ~1e-8 of the elements.
These tests need the extension built (``make install`` builds it): they fail, never skip, without it.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from nexus_sidecar.engine import POLICIES, Engine, InputError, PolicyConfig, kernels
from nexus_sidecar.engine.errors import ConfigError
from nexus_sidecar.engine.hashing import uniforms
from nexus_sidecar.engine.kernels import loader
from nexus_sidecar.engine.policies import ScoreContext, SlotOrder, make_policy
from nexus_sidecar.engine.policies.nexus import nexus_scores
from nexus_sidecar.engine.selection import gumbel, select
from nexus_sidecar.engine.step_fused import _nexus_weight
from nexus_sidecar.engine.walk import walk

from tests.engine.streams import Stream, step_together
from tests.engine.test_engine import _cases, _mutations, _session_with_evictions, _valid

ALL_POLICIES = sorted(POLICIES)
VARIANTS: dict[str, dict[str, object]] = {
    "per_call": {},
    "fixed": {"randomness": "fixed"},
    "pool_max": {"pool": 3},
    "pool_mean": {"pool": 5, "pool_reduce": "mean"},
    "block": {"granularity": "block", "block_size": 4},
    "attn_mean": {"attn_reduce": "mean", "prior": "key_norm", "prior_sharpness": 2.0},
    "no_prior_mix": {"prior_mix": 0.0, "iterations": 1},
    "old_client": {},  # the streams send no priors
    # Call kinds: no reaction term on context calls, another prior share on question calls.
    "context_call": {"react_calls": "question", "question_prior_mix": 0.2},
    "question_call": {"react_calls": "question", "question_prior_mix": 0.2},
}
CALLS = {"context_call": "context", "question_call": "question"}


def _ops():
    ops = kernels.load()
    assert ops is not None, f"the fused kernels must build here (make install builds them): {kernels.failure()}"
    return ops


def test_extension_builds_and_is_the_cpu_default() -> None:
    _ops()
    assert Engine("cpu", kernels="auto").kernels == "fused"
    assert Engine("cpu", kernels="fused").kernels == "fused"
    assert Engine("cpu", kernels="torch").kernels == "torch"


def test_bad_kernel_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="kernels"):
        Engine("cpu", kernels="cuda")
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ConfigError, match=kernels.ENV):
        Engine("cpu")
    monkeypatch.setenv(kernels.ENV, "torch")
    assert Engine("cpu").kernels == "torch"


def test_unbuildable_extension_falls_back_to_torch_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    def broken(verbose: bool = False) -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setattr(loader, "build", broken)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        eng = Engine("cpu", kernels="fused")
    assert eng.kernels == "torch"
    assert "no compiler" in caplog.text and "torch path" in caplog.text
    # The engine still works, on the reference path.
    s = Stream.open(eng, PolicyConfig(budget=8, sinks=1, recent=1, fanout=3).validate(), data_seed=1, prefill=12)
    s.step()
    assert eng.counts(s.handle) == [8]


def test_walk_kernel_is_bit_identical_on_pool_views() -> None:
    ops = _ops()
    g = torch.Generator().manual_seed(3)
    R, W, arena, F = 5, 37, 50, 4
    alive = torch.rand(R, arena, generator=g) > 0.2
    d = torch.where(alive, torch.rand(R, arena, generator=g) ** 3, 0.0)[:, :W].contiguous()
    cols = torch.arange(arena).view(1, arena, 1)
    eidx = (torch.rand(R, arena, F, generator=g) * (cols + 1)).long()  # targets at or before the source
    ew = torch.rand(R, arena, F, generator=g) * (torch.rand(R, arena, F, generator=g) > 0.3)
    # Views narrowed to W columns of a wider arena, as the pool hands them out.
    args = (d, alive[:, :W], eidx[:, :W], ew[:, :W])
    for beta, iterations in ((0.7, 1), (0.7, 3), (0.3, 2)):
        assert torch.equal(ops.walk(*args, beta, iterations), walk(*args, beta, iterations))


# keydiff and knorm refuse steps without their prior: no old-client variant for them.
@pytest.mark.parametrize(("policy", "variant"), [(p, v) for p in ALL_POLICIES for v in sorted(VARIANTS)
                                                 if v != "old_client" or not POLICIES[p].requires])
def test_fused_engine_agrees_with_torch(policy: str, variant: str) -> None:
    priors = variant != "old_client"
    cfg = PolicyConfig(policy=policy, budget=16, sinks=2, recent=3, groups=2, fanout=4, tau=2.0,
                       **VARIANTS[variant]).validate()  # type: ignore[arg-type]
    runs = {}
    for mode in ("torch", "fused"):
        eng = Engine("cpu", kernels=mode)
        assert eng.kernels == mode
        # Three sessions of one batch with other budgets, seeds and lengths: padding rows and columns.
        streams = [Stream.open(eng, cfg.with_(seed=i, budget=cfg.budget + 3 * i), data_seed=i, prefill=20 + 5 * i,
                               k_range=(1, 3 + i), priors=priors, call=CALLS.get(variant, "unspecified"))
                   for i in range(3)]
        runs[mode] = (eng, streams, [[out for _, out in step_together(streams)] for _ in range(20)])
    (eng_t, st_t, calls_t), (eng_f, st_f, calls_f) = runs["torch"], runs["fused"]
    evicted = 0
    for c, (outs_t, outs_f) in enumerate(zip(calls_t, calls_f, strict=True)):
        for a, b in zip(outs_t, outs_f, strict=True):
            assert torch.equal(a.keep, b.keep), f"call {c}: selections differ"
            assert torch.equal(a.slot_positions, b.slot_positions)
            assert torch.equal(a.evicted_age, b.evicted_age)
            assert a.retained == b.retained
            torch.testing.assert_close(a.retained_mass, b.retained_mass, rtol=1e-6, atol=0)
            evicted += a.n_evicted
    assert evicted > 0, "the streams must evict"
    for sa, sb in zip(st_t, st_f, strict=True):
        snap_t, snap_f = eng_t.snapshot(sa.handle), eng_f.snapshot(sb.handle)
        assert snap_t.calls == snap_f.calls
        for ga, gb in zip(snap_t.groups, snap_f.groups, strict=True):
            for name in ("pos", "age", "edge_pos", "edge_w"):
                assert torch.equal(getattr(ga, name), getattr(gb, name)), name
            torch.testing.assert_close(ga.memory, gb.memory, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("reduce", "prior"), [("sum", "key_diversity"), ("mean", "value_norm"), ("sum", None)])
def test_nexus_weights_within_tolerance(reduce: str, prior: str | None) -> None:
    # Scores compared directly (the engine tests above see them only through selections and memory).
    ops = _ops()
    rng = np.random.default_rng(11)
    R, W, F = 4, 300, 6
    alive = torch.from_numpy(rng.random((R, W)) > 0.1)
    ext = torch.cumsum(alive, 1) - 1
    count = alive.sum(1)
    protected = alive & ((ext < 3) | (ext >= (count - 5).unsqueeze(1)))
    cand = alive & ~protected

    def dense(x: np.ndarray) -> torch.Tensor:
        return torch.where(alive, torch.from_numpy(x.astype(np.float32)), 0.0)

    attn, last = dense(rng.exponential(1.0, (R, W)) ** 3), dense(rng.exponential(1.0, (R, W)) ** 2)
    memory = dense(rng.random((R, W)) * 1e-2)
    age = torch.from_numpy(rng.integers(0, 400, (R, W)).astype(np.int32))
    priors = {} if prior is None else {prior: dense(rng.uniform(-1, 1, (R, W)) if prior == "key_diversity"
                                                    else rng.gamma(2.0, 1.0, (R, W)))}
    cols = torch.arange(W).view(1, W, 1)
    eidx = (torch.from_numpy(rng.random((R, W, F))) * (cols + 1)).long()
    ew = torch.from_numpy(rng.random((R, W, F)).astype(np.float32))
    policy = make_policy(PolicyConfig(policy="nexus", attn_reduce=reduce, prior=prior or "key_diversity",
                                      fanout=F).validate())
    n_new = torch.full((R,), 3)
    ctx = ScoreContext(attn=attn, last=last, memory=memory, age=age, valid=alive, cand=cand,
                       walk=lambda d: walk(d, alive, eidx, ew, policy.cfg.beta, policy.cfg.iterations),
                       slot_order=SlotOrder(ext, alive, W), count=count, n_new=n_new, priors=priors)
    ref = nexus_scores(policy, ctx)
    new_memory = memory.clone()
    weight = _nexus_weight(ops, policy, ctx, new_memory, (eidx, ew), torch.full((R,), 400))
    torch.testing.assert_close(weight[cand], ref.weight[cand], rtol=1e-6, atol=0)
    torch.testing.assert_close(new_memory, ref.memory, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("case", "field"), _cases()[::2])
def test_invalid_input_refused_alike(case: str, field: str) -> None:
    # The fused value checks give the reference's field and reason, and change nothing either way.
    answers = []
    for mode in ("torch", "fused"):
        s, gone = _session_with_evictions()
        eng = Engine("cpu", kernels=mode)
        h = eng.restore(s.engine.snapshot(s.handle))
        before = eng.snapshot(h).to_bytes()
        mutate = {c: m for c, _, m in _mutations(s, gone)}[case]
        inp = _valid(s)
        mutate(inp)
        with pytest.raises(InputError) as info:
            eng.step({h: inp})
        assert eng.snapshot(h).to_bytes() == before
        answers.append((info.value.field, str(info.value)))
    assert answers[0] == answers[1]
    assert answers[0][0] == field


@pytest.mark.parametrize(("tau", "fixed"), [(None, False), (0.0, False), (0.5, False), (2.0, False), (16.0, False),
                                            (0.0, True), (16.0, True)])
def test_token_selection_kernel_is_exact(tau: float | None, fixed: bool) -> None:
    # Rows with every number of evictions (0, 1, several, all candidates) and weights with zeros,
    # ties, subnormals and a huge range: the kernel evicts exactly the reference's slots.
    ops = _ops()
    rng = np.random.default_rng(5)
    R, W = 240, 97
    valid = torch.from_numpy(rng.random((R, W)) > 0.1)
    cand = valid & torch.from_numpy(rng.random((R, W)) > 0.15)
    kinds = [rng.random((R // 4, W)), rng.exponential(1.0, (R // 4, W)) ** 8,
             np.round(rng.random((R // 4, W)), 1), rng.random((R // 4, W)) * 1e-40]
    weight = torch.from_numpy(np.concatenate(kinds).astype(np.float32))
    weight[torch.from_numpy(rng.random((R, W)) < 0.05)] = 0.0
    n = valid.sum(1)
    need = torch.from_numpy(rng.integers(0, 4, R)).clamp(max=n)
    need[::7] = n[::7]  # more than the candidates: all of them go
    pos = torch.where(valid, torch.arange(W).expand(R, W) * 3, torch.iinfo(torch.int64).max)
    seed, group, call = torch.arange(R) - 50, torch.arange(R) % 3, torch.full((R,), 7)
    noise = gumbel(uniforms(seed, group, pos, torch.zeros(R, dtype=torch.int64))) if fixed else None
    ref = select(weight, valid, valid & ~cand, pos, n, n - need, torch.zeros(R, dtype=torch.int64), seed, group,
                 call, tau=tau, pool=1, block_size=None, noise=noise).evict
    reservoir = tau is not None
    got = ops.select_token(weight, cand, torch.where(n > n - need, need, 0), int(reservoir), tau or 0.0, noise, pos,
                           seed, group, call)
    assert torch.equal(got, ref)
    assert int(got.sum()) > R


def test_prior_mass_exp_is_the_references() -> None:
    # The kernel's vectorised exp against the reference's float64 torch.exp rounded to float32, on
    # every 61st float32 bit pattern in [-110, 0] (18M arguments: underflow, subnormal results, 1.0).
    ops = _ops()
    lo = int(torch.tensor(-110.0).view(torch.int32))
    x = torch.arange(-(2**31), lo + 1, 61, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = x[: x.numel() // 1000 * 1000].reshape(1000, -1).contiguous()
    assert torch.equal(ops.prior_mass(x, 0.0, 1.0), torch.exp(x.double()).float())
    z = torch.from_numpy(np.random.default_rng(2).normal(size=(64, 500)).astype(np.float32))
    ref = torch.exp((z - 1.5).clamp(max=0.0).mul(4.0).double()).float()
    assert torch.equal(ops.prior_mass(z, 1.5, 4.0), ref)
