"""``Engine.step_batch`` (the columnar entry) against ``Engine.step`` (one StepInput per session).

Same sessions, same inputs, two engines: every output, every error and the sessions' snapshots after
each call must be identical. The one-entry path (fused kernels, Nexus, token granularity) must take
the columnar call; the other policies and the torch kernels run the per-session path behind it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nexus_sidecar.engine import BatchInput, Engine, InputError, PolicyConfig, StepOutput

from tests.engine.streams import random_input

B, G, F = 5, 2, 4


def _batch(inputs: list) -> BatchInput:
    return BatchInput(new_positions=torch.stack([i.new_positions for i in inputs]),
                      attn=torch.cat([i.attn for i in inputs]).half(), last=torch.cat([i.last for i in inputs]),
                      edge_pos=torch.cat([i.edge_pos for i in inputs]).int(),
                      edge_w=torch.cat([i.edge_w for i in inputs]), groups=[G] * len(inputs),
                      priors={n: torch.cat([getattr(i, n) for i in inputs]) for n in inputs[0].priors()},
                      call=inputs[0].call)


def _run(policy: str, kernels: str, calls: int = 12, bad: tuple[int, int] | None = None
         ) -> tuple[list, int]:
    cfg = PolicyConfig(policy=policy, budget=24, sinks=2, recent=3, groups=G, fanout=F, tau=2.0).validate()
    ref, new = Engine("cpu", kernels=kernels), Engine("cpu", kernels=kernels)
    hr = [ref.open(cfg.with_(seed=i)) for i in range(B)]
    hn = [new.open(cfg.with_(seed=i)) for i in range(B)]
    columnar = []
    real = new._step_columnar
    new._step_columnar = lambda *a: columnar.append(out := real(*a)) or out  # type: ignore[method-assign]
    rng = np.random.default_rng(3)
    pos = 0
    evicted = refused = 0
    for c in range(calls):
        k = 30 if c == 0 else int(rng.integers(1, 4))
        new_pos = np.arange(pos, pos + k, dtype=np.int64)
        pos += k
        inputs = [random_input(rng, ref.positions(h), new_pos, F) for h in hr]
        if bad is not None and c == bad[0]:
            inputs[bad[1]].last[0, 0] = float("nan")
        # The reference sees exactly what the batch carries (attn travels as float16).
        for i in inputs:
            i.attn = i.attn.half().float()
        want = ref.step(dict(zip(hr, inputs, strict=True)), raise_errors=False)
        got = new.step_batch(hn, _batch(inputs))
        r0 = 0
        for b, (h, hh) in enumerate(zip(hr, hn, strict=True)):
            w = want[h]
            if isinstance(w, InputError):
                assert isinstance(got.errors[b], InputError)
                assert (got.errors[b].field, str(got.errors[b])) == (w.field, str(w))
                refused += 1
            else:
                assert b not in got.errors
                o = got.session(b, r0)
                assert isinstance(w, StepOutput)
                assert torch.equal(o.keep, w.keep) and torch.equal(o.slot_positions, w.slot_positions)
                assert torch.equal(o.evicted_age, w.evicted_age) and o.retained == w.retained
                assert torch.equal(o.retained_mass, w.retained_mass)
                evicted += w.n_evicted
            assert new.snapshot(hh).to_bytes() == ref.snapshot(h).to_bytes()
            r0 += G
    assert evicted > 0, "the calls must evict"
    return columnar, refused


def test_one_entry_batch_runs_columnar_with_the_same_answers() -> None:
    columnar, refused = _run("nexus", "fused")
    assert not refused
    assert columnar and all(out is not None for out in columnar)


@pytest.mark.parametrize(("policy", "kernels"), [("nexus", "torch"), ("h2o", "fused"), ("snapkv", "fused")])
def test_other_paths_give_the_same_answers(policy: str, kernels: str) -> None:
    columnar, _ = _run(policy, kernels)
    assert columnar and all(out is None for out in columnar)


def test_a_bad_session_is_named_and_the_others_advance() -> None:
    columnar, refused = _run("nexus", "fused", calls=6, bad=(3, 2))
    assert refused == 1
    assert columnar[3] is None and all(out is not None for i, out in enumerate(columnar) if i != 3)


def test_handles_must_match_the_batch() -> None:
    eng = Engine("cpu", kernels="fused")
    h = eng.open(PolicyConfig(groups=G, fanout=F).validate())
    inp = random_input(np.random.default_rng(0), eng.positions(h), np.arange(4), F)
    with pytest.raises(InputError, match="handles"):
        eng.step_batch([h, h], _batch([inp]))


def test_engine_bench_times_both_entries() -> None:
    # The service benchmark's engine-alone reference: both entries timed on one steady-state engine.
    from nexus_sidecar.bench import engine_bench

    rec = engine_bench.measure("nexus", "cpu", 4, 64, 4, 2, 4, 1, priors=False, columnar=True)
    assert rec["entry"] in ("step", "step_batch") and rec["calls_timed"] == 4
    assert rec["ms_per_call"] == min(rec["ms_per_call_step"], rec["ms_per_call_step_batch"])
