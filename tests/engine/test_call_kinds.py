"""The call kind a worker sends (context / question / decode / unspecified) and the Nexus knobs that
read it: ``react_calls`` (the newest query's own row scores only non-context calls) and
``question_prior_mix`` (the prior's share on question and decode calls)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from nexus_sidecar.engine import CALL_KINDS, Engine, InputError, PolicyConfig, StepInput

from tests.engine.streams import Stream, evicted_lists


def _no_edges(k: int, f: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((1, k, f), -1), torch.zeros(1, k, f)


def _cfg(**kw: object) -> PolicyConfig:
    return PolicyConfig(policy="nexus_topk", sinks=0, recent=0, fanout=2, beta=0.0, **kw).validate()  # type: ignore[arg-type]


def _evicted(cfg: PolicyConfig, call: str, attn: torch.Tensor, last: torch.Tensor, kd: torch.Tensor) -> list[int]:
    eng = Engine("cpu")
    h = eng.open(cfg)
    n = attn.shape[1]
    return evicted_lists(eng.step({h: StepInput(torch.arange(n), attn, last, *_no_edges(n), key_diversity=kd,
                                                call=call)})[h])[0]


def _reaction_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """10 slots: the prior ranks slot 2 lowest; the newest query looks only at slot 2."""
    n = 10
    kd = torch.linspace(0.9, -0.9, n)[None].clone()
    kd[0, 2], kd[0, n - 1] = -0.95, 0.0  # slot 2 is the least distinctive key
    last = torch.zeros(1, n)
    last[0, 2] = 1.0
    return torch.zeros(1, n), last, kd


@pytest.mark.parametrize(("react_calls", "call", "saved"), [
    ("all", "context", True), ("all", "question", True),
    ("question", "context", False), ("question", "question", True), ("question", "decode", True),
    ("question", "unspecified", True),  # an old client: scored as before the knob existed
])
def test_the_newest_querys_row_saves_a_token_only_on_the_calls_react_calls_allows(
        react_calls: str, call: str, saved: bool) -> None:
    attn, last, kd = _reaction_case()
    gone = _evicted(_cfg(budget=9, prior_mix=1.0, react_calls=react_calls), call, attn, last, kd)
    assert len(gone) == 1 and (gone != [2]) == saved


def test_question_prior_mix_is_the_prior_share_on_question_and_decode_calls() -> None:
    # Attention favours slot 7; the prior ranks slot 7 lowest. With prior_mix = 1 alone, slot 7 goes;
    # a question_prior_mix of 0 hands question and decode calls to attention, which keeps it.
    n = 10
    attn = torch.full((1, n), 0.01)
    attn[0, 7] = 5.0
    kd = torch.linspace(0.9, -0.9, n)[None].clone()
    kd[0, 7], kd[0, n - 1] = -0.95, 0.0
    cfg = _cfg(budget=9, prior_mix=1.0, question_prior_mix=0.0, react_calls="question")
    no_last = torch.zeros(1, n)
    assert _evicted(cfg, "context", attn, no_last, kd) == [7]
    assert _evicted(cfg, "unspecified", attn, no_last, kd) == [7]
    for call in ("question", "decode"):
        assert 7 not in _evicted(cfg, call, attn, no_last, kd)
    assert _evicted(cfg.with_(question_prior_mix=None), "question", attn, no_last, kd) == [7]


def test_a_prior_only_on_question_calls_is_still_read() -> None:
    cfg = PolicyConfig(policy="nexus", prior_mix=0.0, question_prior_mix=0.5).validate()
    assert Engine("cpu").open(cfg) is not None
    from nexus_sidecar.engine.policies import make_policy

    assert make_policy(cfg).reads() == ("key_diversity",)
    assert make_policy(cfg.with_(question_prior_mix=None)).reads() == ()


def test_an_unknown_call_kind_is_refused_by_name_and_changes_nothing() -> None:
    s = Stream.open(Engine("cpu"), PolicyConfig(budget=8, sinks=1, recent=1, fanout=3), data_seed=1, prefill=10)
    before = s.engine.snapshot(s.handle).to_bytes()
    inp = dataclasses.replace(s.next_input(), call="prefill")
    with pytest.raises(InputError) as err:
        s.engine.step({s.handle: inp})
    assert err.value.field == "call" and "prefill" in err.value.reason
    assert s.engine.snapshot(s.handle).to_bytes() == before


def test_sessions_with_different_call_kinds_in_one_step_answer_as_if_alone() -> None:
    cfg = PolicyConfig(policy="nexus", budget=12, sinks=1, recent=2, fanout=3, seed=3, tau=4.0,
                       react_calls="question", question_prior_mix=0.2)
    together = Engine("cpu")
    streams = [Stream.open(together, cfg, data_seed=d, prefill=16) for d in range(4)]
    alone = [Stream.open(Engine("cpu"), cfg, data_seed=d, prefill=16) for d in range(4)]
    for step in range(12):
        inps = [dataclasses.replace(s.next_input(), call=CALL_KINDS[(i + step) % len(CALL_KINDS)])
                for i, s in enumerate(streams)]
        outs = together.step({s.handle: inp for s, inp in zip(streams, inps, strict=True)})
        for s, a, inp in zip(streams, alone, inps, strict=True):
            ref = a.engine.step({a.handle: inp})[a.handle]
            assert evicted_lists(outs[s.handle]) == evicted_lists(ref)
            s.advance(inp)
            a.advance(inp)
    for s, a in zip(streams, alone, strict=True):
        assert s.engine.snapshot(s.handle).to_bytes() == a.engine.snapshot(a.handle).to_bytes()
