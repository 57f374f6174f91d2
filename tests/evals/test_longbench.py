"""Metrics and the LongBench-format JSONL loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nexus_sidecar.evals.longbench import load_longbench, normalize_text, rouge_l, score, token_f1


def test_normalize_and_match_metrics() -> None:
    assert normalize_text("The  Pass-Key, is: 12345!") == "passkey is 12345"
    assert score("match_all", " 12345 and 67890.", ["12345", "67890", "11111"]) == pytest.approx(2 / 3)
    assert score("match_any", "it is 67890", ["12345", "67890"]) == 1.0
    assert score("match_any", "it is 6789", ["67890"]) == 0.0
    assert score("exact", "The Paris.", ["paris"]) == 1.0
    assert score("exact", "Paris, France", ["paris"]) == 0.0


def test_token_f1_and_rouge_l() -> None:
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(2 * (1.0 * 2 / 3) / (1.0 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a b", "c d") == 0.0
    # LCS of [x, y, z, w] and [x, z, w, q] is [x, z, w] = 3: P = R = 3/4.
    assert rouge_l("x y z w", "x z w q") == pytest.approx(0.75)
    assert rouge_l("x y", "p q") == 0.0
    assert score("f1", "red apple", ["green", "red apple pie"]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", ["a"])
    with pytest.raises(ValueError, match="no gold"):
        score("f1", "a", [])


def test_loader_reads_a_small_file(tmp_path: Path) -> None:
    f = tmp_path / "tiny.jsonl"
    rows = [
        {
            "_id": "a1",
            "dataset": "hotpotqa",
            "context": "Alice lives in Paris.",
            "input": "Where?",
            "answers": ["Paris"],
        },
        {"context": "Bob is 42.", "input": "Age?", "answers": ["42", "forty-two"]},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = load_longbench(f)
    assert [s.task for s in samples] == ["hotpotqa", "tiny"]
    assert samples[0].sample_id == "hotpotqa/a1" and samples[0].metric == "f1"
    assert samples[1].metric == "match_any" and samples[1].answers == ("42", "forty-two")
    assert "Where?" in samples[0].question and samples[0].context == rows[0]["context"]
    assert load_longbench(f, metric="exact", limit=1)[0].metric == "exact"
    assert score(samples[0].metric, "It is Paris.", list(samples[0].answers)) == pytest.approx(0.5)  # P 1/3, R 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"context": "c", "answers": ["a"]}', "'input' must be a str"),
        ('{"context": "c", "input": "q", "answers": []}', "non-empty list"),
    ],
)
def test_loader_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"context": "c", "input": "q", "answers": ["a"]}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_longbench(f)
    assert "bad.jsonl:2" in str(info.value)


def test_loader_missing_file_and_bad_metric(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_longbench(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown metric"):
        load_longbench(tmp_path / "nope.jsonl", metric="bleu")
