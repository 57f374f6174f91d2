"""The multi-turn setting: generated conversations, one stream under one budget, answers kept in it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from nexus_client.hf import LocalBackend
from nexus_sidecar.evals import report
from nexus_sidecar.evals.multiturn import conversation_pieces, drive_multiturn
from nexus_sidecar.evals.runner import EvalSettings, PolicySpec, expand_runs, iter_eval
from nexus_sidecar.evals.tasks import TURN_CHUNKS, TURN_CLOSING, TURN_FIRST_ASK, TURN_NEEDLES, generate_sample

TURNS = TURN_CHUNKS - TURN_FIRST_ASK + TURN_CLOSING  # questions per conversation

SETTINGS = EvalSettings(model="tiny", chunk_size=16, chat=False, base_knobs={"sinks": 2, "recent": 4})


def test_turnkeys_plants_keys_across_chunks_and_asks_in_an_unpredictable_order() -> None:
    orders = set()
    for i in range(12):
        s = generate_sample("turnkeys", 512, "dev", i)
        assert s == generate_sample("turnkeys", 512, "dev", i)  # a pure function of its id
        assert s.sample_id == f"turnkeys/v1/512/dev/{i}"  # the task's own generator version
        assert len(s.turns) == TURN_CHUNKS and s.context == "\n\n".join(t.text for t in s.turns)
        qs = s.questions
        assert len(qs) == TURNS and len({q.answers for q in qs}) == len(qs)  # no key twice
        asked = [q for t in s.turns for q in t.asks]
        assert asked == list(range(len(qs)))  # the questions are in asking order
        for qi, (chunk, after) in enumerate(zip(s.meta["key_chunk"], s.meta["asked_after"], strict=True)):
            assert chunk <= after and qi in s.turns[after].asks
            (ans,) = qs[qi].answers
            assert ans in s.turns[chunk].text and not any(ans in t.text for j, t in enumerate(s.turns) if j != chunk)
        assert len(s.meta["distractors"]) == TURN_CHUNKS * TURN_NEEDLES - len(qs)
        assert all(str(d) in s.context for d in s.meta["distractors"])
        orders.add(tuple(s.meta["key_chunk"]))
    # Which chunk a turn asks about varies from sample to sample, and late turns reach back to early chunks.
    assert len(orders) >= 6 and any(o[-1] < TURN_CHUNKS - 2 for o in orders)
    assert all(o[0] in (0, 1) for o in orders) and {o[0] for o in orders} == {0, 1}  # even turn 1 has a choice
    assert generate_sample("turnkeys", 512, "dev", 0).context != generate_sample("turnkeys", 512, "test", 0).context


def _pieces(tok: Any, length: int = 256) -> tuple[Any, list[Any]]:
    s = generate_sample("turnkeys", length, "dev", 1)
    return s, conversation_pieces(tok, s)


def test_the_stream_holds_its_budget_marks_every_call_and_keeps_the_answers(tiny: Any) -> None:
    model, tok = tiny
    s, pieces = _pieces(tok)
    assert [p.question for p in pieces if p.question is not None] == list(range(len(s.questions)))
    context = sum(len(p.ids) for p in pieces if p.question is None)
    budget = round(0.3 * context)
    cfg = {"policy": "nexus", "budget": budget, "slack": 0, "sinks": 2, "recent": 4}
    res = drive_multiturn(model, tok, pieces, 4, backend=LocalBackend(), policy_config=cfg, chunk_size=16)
    answered = sum(len(a.token_ids) for a in res.answers)
    widest = max(16, *(len(p.ids) for p in pieces if p.question is not None))
    assert res.held_after_calls <= budget < res.peak_cache <= budget + widest  # one piece over, transiently
    assert res.calls_by_kind is not None and res.calls_by_kind["question"] == len(s.questions)
    assert res.calls_by_kind["context"] == sum(-(-len(p.ids) // 16) for p in pieces if p.question is None)
    assert res.calls_by_kind["decode"] == answered  # every answer token is fed (and kept in the stream)
    assert res.policy_calls == sum(res.calls_by_kind.values())
    stream = sum(len(p.ids) for p in pieces) + answered
    assert res.evicted == stream - res.kept_context
    # Every turn starts where the previous piece and its answer ended: positions are the conversation's.
    assert res.starts is not None and res.starts[0] == 0
    assert all(r <= budget for r in (len(a.retained or []) for a in res.answers))
    assert all(p < res.starts[i] for i, pc in enumerate(pieces) if pc.question is not None
               for p in res.answers[pc.question].retained or [])  # fmt: skip


def test_per_layer_groups_with_a_shared_budget_cut_each_layer_on_its_own(tiny: Any) -> None:
    """The worker's per-layer cache surgery under budgets that move between layers: each layer of the
    cache holds what its group kept (lengths differ), and the layers together hold the session budget."""
    model, tok = tiny
    _, pieces = _pieces(tok)
    budget = 24
    cfg = {"policy": "tova", "budget": budget, "slack": 0, "sinks": 2, "recent": 4, "groups": 2,
           "budget_alloc": "shared", "budget_floor": 0.25}  # fmt: skip
    res = drive_multiturn(model, tok, pieces, 4, backend=LocalBackend(), policy_config=cfg, chunk_size=16)
    assert res.layer_lengths is not None and sum(res.layer_lengths) == 2 * budget
    assert len(set(res.layer_lengths)) > 1 and min(res.layer_lengths) >= 6  # floor ceil(0.25 * 24) = 6
    widest = max(16, *(len(p.ids) for p in pieces if p.question is not None))
    assert res.peak_layer_tokens <= 2 * (budget + widest) < 2 * res.peak_cache  # KV bytes: the layers' sum
    fixed = drive_multiturn(model, tok, pieces, 4, backend=LocalBackend(),
                            policy_config={**cfg, "budget_alloc": "fixed"}, chunk_size=16)  # fmt: skip
    assert fixed.layer_lengths == [budget, budget]


def test_dense_stream_equals_one_pass_over_the_whole_conversation(tiny: Any) -> None:
    """Dense multiturn = teacher forcing the conversation as it happened: each answer is what one
    forward pass over everything before it predicts, so pieces, answers and positions are in order."""
    model, tok = tiny
    _, pieces = _pieces(tok)
    res = drive_multiturn(model, tok, pieces, 4)
    assert res.evicted == 0 and res.policy_calls == 0
    ids: list[int] = []
    expected: list[tuple[int, int]] = []  # (index in ids whose logits predict, token)
    for piece in pieces:
        ids += piece.ids
        if piece.question is not None:
            for tok_id in res.answers[piece.question].token_ids:
                expected.append((len(ids) - 1, tok_id))
                ids.append(tok_id)
    assert res.kept_context == len(ids)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    assert [int(logits[i].argmax()) for i, _ in expected] == [t for _, t in expected]


def test_runner_plans_dense_per_stream_and_records_each_turn(tiny: Any, tmp_path: Path) -> None:
    model, tok = tiny
    policies = [PolicySpec.parse(p) for p in ("dense", "nexus", "kvpress:tova")]
    only = expand_runs(policies, [0.8], ["multiturn"])
    assert [(r.policy.name, r.eviction, r.mode) for r in only] == [("dense", 0.0, "multiturn"),
                                                                  ("nexus", 0.8, "multiturn")]  # fmt: skip
    both = expand_runs(policies[:2], [0.8], ["streaming", "multiturn"])
    assert {(r.policy.name, r.mode) for r in both} == {("dense", "dense"), ("dense", "multiturn"),
                                                       ("nexus", "streaming"), ("nexus", "multiturn")}  # fmt: skip
    samples = [generate_sample("turnkeys", 256, "dev", i) for i in range(2)]
    path = tmp_path / "runs.jsonl"
    recs = list(iter_eval(model, tok, samples, only, SETTINGS, LocalBackend, path, progress=False))
    assert len(recs) == 4 and {r["mode"] for r in recs} == {"multiturn"}
    for r in recs:
        assert len(r["scores"]) == len(r["outputs"]) == TURNS
        assert r["key_chunk"] == generate_sample("turnkeys", 256, "dev", int(r["sample_id"][-1])).meta["key_chunk"]
        if r["policy"] == "dense":
            assert r["evicted"] == 0 and r["budget"] == r["context_tokens"]
        else:
            assert r["held_after_calls"] <= r["budget"] == round(0.2 * r["context_tokens"])
            assert Counter(r["calls_by_kind"])["question"] == TURNS
    again = list(iter_eval(model, tok, samples, only, SETTINGS, lambda: pytest.fail("recomputed"), path,
                           progress=False))  # fmt: skip
    assert again == recs
    # The report: dense's own multiturn stream is the reference row, and per-turn accuracy is tabled.
    records = report.aggregate(recs)
    md = report.markdown(records)
    assert "## mode multiturn, eviction 0.8" in md and md.count("| dense |") == 1
    turns = report.per_turn(recs)
    assert {(t["policy"], t["turn"]) for t in turns} == {(p, i) for p in ("dense", "nexus")
                                                         for i in range(1, TURNS + 1)}  # fmt: skip
    assert all(t["n"] == 2 for t in turns)
    assert "per turn" in report.per_turn_markdown(turns)


def test_multiturn_refuses_the_chat_format(tiny: Any) -> None:
    _, tok = tiny
    with pytest.raises(ValueError, match="plain"):
        conversation_pieces(tok, generate_sample("turnkeys", 256, "dev", 0), chat=True)
