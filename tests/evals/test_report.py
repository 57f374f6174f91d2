"""Aggregation, confidence intervals, the verdict, the markdown table and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nexus_sidecar.evals.report import aggregate, ci95, markdown, paired, plot, verdict, verdict_markdown, wilson


def _run(
    policy: str, ev: float, mode: str, task: str, score: float, peak: int = 100, dense: int = 500
) -> dict[str, Any]:
    return {"policy": policy, "eviction": ev, "mode": mode, "task": task, "score": score,
            "peak_kv_bytes": peak, "dense_kv_bytes": dense, "seconds": 1.0}  # fmt: skip


def test_wilson_and_normal_intervals() -> None:
    lo, hi = wilson(8, 8)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.6756, abs=1e-3)  # textbook value for 8/8
    lo, hi = wilson(0, 10)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(0.2775, abs=1e-3)
    assert ci95([1.0, 0.0, 1.0, 1.0]) == wilson(3, 4)
    lo, hi = ci95([0.5, 0.5, 0.5])
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # fractional scores: normal approximation
    with pytest.raises(ValueError):
        ci95([])


def _runs() -> list[dict[str, Any]]:
    runs = [_run("dense", 0.0, "dense", t, 1.0, 500) for t in ("passkey", "cwe") for _ in range(2)]
    runs += [_run("nexus", 0.8, "agnostic", "passkey", s) for s in (1.0, 1.0)]
    runs += [_run("nexus", 0.8, "agnostic", "cwe", s, peak=120) for s in (1.0, 0.5)]
    runs += [_run("tova", 0.8, "agnostic", "passkey", s) for s in (1.0, 0.0)]
    runs += [_run("tova", 0.8, "agnostic", "cwe", s) for s in (1.0, 1.0)]
    return runs


def test_aggregate_records_and_average() -> None:
    recs = aggregate(_runs())
    idx = {(r["policy"], r["mode"], r["task"]): r for r in recs}
    avg = idx[("nexus", "agnostic", "average")]
    assert avg["score"] == pytest.approx(0.875) and avg["n"] == 4 and avg["peak_kv_bytes"] == 120
    assert avg["kv_ratio"] == pytest.approx(120 / 500)
    assert idx[("tova", "agnostic", "passkey")]["score"] == 0.5
    assert idx[("dense", "dense", "average")]["score"] == 1.0
    for r in recs:
        assert r["ci95"][0] <= r["score"] <= r["ci95"][1]
        assert set(r) >= {"policy", "eviction", "mode", "task", "score", "n", "ci95", "peak_kv_bytes"}


def test_verdict_checks_both_claims() -> None:
    v = verdict(aggregate(_runs()), "nexus", 0.8)["modes"]["agnostic"]
    assert v["gap_to_dense"] == pytest.approx(0.125) and not v["within_0.01_of_dense"]
    assert v["nexus_retrieval"] == 1.0 and v["best_topk_baseline"] == "tova" and v["best_topk_retrieval"] == 0.5
    assert v["beats_best_topk_on_retrieval"]
    perfect = [r for r in _runs() if r["policy"] != "nexus"] + [
        _run("nexus", 0.8, "agnostic", t, 1.0) for t in ("passkey", "cwe")
    ]
    assert verdict(aggregate(perfect), "nexus", 0.8)["modes"]["agnostic"]["within_0.01_of_dense"]


def test_paired_difference_pairs_samples_and_bootstraps_a_ci() -> None:
    def runs(policy: str, scores: list[float]) -> list[dict[str, Any]]:
        return [{**_run(policy, 0.8, "streaming", "passkey", s), "sample_id": f"passkey/{i}"}
                for i, s in enumerate(scores)]  # fmt: skip

    a = runs("nexus", [1.0] * 20 + [0.0] * 20)
    b = runs("tova", [0.0] * 10 + [1.0] * 10 + [0.0] * 20)  # same hard samples, 10 fewer wins
    res = paired(a + b, ("nexus", 0.8, "streaming"), ("tova", 0.8, "streaming"))
    assert res is not None and res["n"] == 40 and (res["wins"], res["losses"]) == (10, 0)
    assert res["diff"] == pytest.approx(0.25)
    assert 0.1 < res["ci95"][0] < 0.25 < res["ci95"][1] < 0.4  # all differences >= 0: CI above 0
    assert paired(a + b, ("nexus", 0.8, "streaming"), ("tova", 0.8, "streaming")) == res  # seeded
    tie = paired(a + a[:0] + runs("h2o", [1.0] * 20 + [0.0] * 20), ("nexus", 0.8, "streaming"),
                 ("h2o", 0.8, "streaming"))  # fmt: skip
    assert tie is not None and tie["diff"] == 0.0 and tie["ci95"] == [0.0, 0.0]
    assert paired(a, ("nexus", 0.8, "streaming"), ("snapkv", 0.8, "streaming")) is None
    # Only the samples both ran are compared; tasks filter the samples.
    assert paired(a + b[:5], ("nexus", 0.8, "streaming"), ("tova", 0.8, "streaming"))["n"] == 5
    assert paired(a + b, ("nexus", 0.8, "streaming"), ("tova", 0.8, "streaming"), tasks={"cwe"}) is None


def test_verdict_pairs_runs_and_counts_pooled_top_k_baselines() -> None:
    runs = [{**r, "sample_id": f"{r['task']}/{i % 2}"} for i, r in enumerate(_runs())]
    runs += [{**_run("tova:pool=5", 0.8, "agnostic", t, 1.0), "sample_id": f"{t}/{i}"}
             for t in ("passkey", "cwe") for i in range(2)]  # fmt: skip
    v = verdict(aggregate(runs), "nexus", 0.8, runs)["modes"]["agnostic"]
    assert v["best_topk_baseline"] == "tova:pool=5" and not v["beats_best_topk_on_retrieval"]
    p = v["paired"]
    assert p["dense_minus_nexus"]["n"] == 4 and p["dense_minus_nexus"]["diff"] == pytest.approx(0.125)
    assert p["nexus_minus_best_topk_retrieval"]["n"] == 2 and p["nexus_minus_best_topk_retrieval"]["diff"] == 0.0
    assert p["nexus_minus_topk_ablation"] is None  # no nexus_topk ran
    table = verdict_markdown([verdict(aggregate(runs), "nexus", 0.8, runs)])
    row = table.splitlines()[2]
    assert row.startswith("| nexus | 0.8 | agnostic | 0.875 | 1.000 | +0.125 [") and "(1/0, n=4)" in row
    assert "tova:pool=5 (1.000)" in row and row.endswith("| no | - |")


def test_answer_kept_is_averaged_and_shown_only_when_recorded() -> None:
    assert "answer tokens kept" not in markdown(aggregate(_runs()))
    runs = [{**r, "answer_kept": 0.5 if r["policy"] == "nexus" else None} for r in _runs()]
    runs[-1]["answer_kept"] = 1.0  # one tova sample recorded it
    recs = {(r["policy"], r["task"]): r for r in aggregate(runs)}
    assert recs[("nexus", "average")]["answer_kept"] == 0.5 and recs[("tova", "average")]["answer_kept"] == 1.0
    assert recs[("dense", "average")]["answer_kept"] is None
    md = markdown(aggregate(runs))
    assert "answer tokens kept" in md and "| 0.500 |" in md and md.count("| - |") >= 1


def test_markdown_and_plot(tmp_path: Path) -> None:
    recs = aggregate(_runs())
    md = markdown(recs, "t")
    assert "## mode agnostic, eviction 0.8" in md and "| dense |" in md and "| nexus |" in md
    assert "0.875 [" in md and "passkey (n=2)" in md
    out = tmp_path / "p.png"
    plot(recs, out, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_spread_groups_labels_that_differ_only_in_seed() -> None:
    from nexus_sidecar.evals.report import seed_spread, seed_spread_markdown

    def avg(policy: str, score: float, mode: str = "agnostic") -> dict:
        return {"policy": policy, "eviction": 0.8, "mode": mode, "task": "average", "score": score}

    records = [avg("nexus:tau=4", 0.5), avg("nexus:seed=1:tau=4", 0.7), avg("nexus:seed=2:tau=4", 0.6),
               avg("tova", 0.4), avg("nexus:tau=4", 0.3, "aware"), avg("dense", 0.9)]
    rows = seed_spread(records)
    assert len(rows) == 1  # tova has one seed; the aware nexus one too
    (r,) = rows
    assert (r["policy"], r["mode"], r["seeds"]) == ("nexus:tau=4", "agnostic", [0, 1, 2])
    assert r["mean"] == 0.6 and abs(r["std"] - 0.1) < 1e-9 and r["scores"] == [0.5, 0.7, 0.6]
    assert "0.600 +- 0.100" in seed_spread_markdown(rows)


def test_agreement_pairs_ours_with_kvpress_at_both_granularities() -> None:
    from nexus_sidecar.evals.report import agreement, agreement_markdown

    def run(policy: str, mode: str, sid: int, score: float) -> dict[str, Any]:
        return {**_run(policy, 0.8, mode, "passkey", score), "sample_id": f"s{sid}"}

    runs = [run("snapkv", "aware", i, s) for i, s in enumerate((1.0, 1.0, 0.0, 1.0))]
    runs += [run("kvpress:snapkv", "aware", i, 0.0) for i in range(4)]
    runs += [run("kvpress:snapkv:select=shared", "aware", i, s) for i, s in enumerate((1.0, 1.0, 0.0, 0.0))]
    runs += [run("kvpress:keydiff", "aware", i, 1.0) for i in range(4)]  # no "keydiff" of ours: no row
    rows = agreement(runs, 0.8)
    assert [(r["ours"], r["kvpress"]) for r in rows] == [("snapkv", "kvpress:snapkv"),
                                                         ("snapkv", "kvpress:snapkv:select=shared")]
    per_head, shared = rows
    assert per_head["ours_score"] == 0.75 and per_head["kvpress_score"] == 0.0 and per_head["same_answer"] == 0.25
    assert shared["kvpress_score"] == 0.5 and shared["same_answer"] == 0.75
    assert shared["paired"]["n"] == 4 and shared["paired"]["diff"] == pytest.approx(0.25)
    assert "snapkv vs kvpress:snapkv:select=shared | aware" in agreement_markdown(rows)
