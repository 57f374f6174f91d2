"""Answer metrics and a loader for LongBench-format JSONL files.

Metrics (``score(metric, prediction, answers) -> float in [0, 1]``), all over a normalised text
(lower case, punctuation and the articles a/an/the removed, whitespace collapsed, as SQuAD and
LongBench normalise):

- ``match_all``: fraction of the answers that occur in the prediction (RULER's string_match_all).
- ``match_any``: 1 if any answer occurs in the prediction (RULER's string_match_part).
- ``exact``: 1 if the normalised prediction equals a normalised answer.
- ``f1``: best token-level F1 against any answer (LongBench's qa_f1_score).
- ``rouge_l``: best ROUGE-L F-measure (longest common token subsequence) against any answer
  (LongBench uses ROUGE-L for summarisation; this is the plain LCS form, no stemming).

LongBench JSONL: one object per line with ``context`` (str), ``input`` (the question, str) and
``answers`` (list of str); optional ``_id``, ``dataset`` and ``length``. The metric comes from the
``--metric`` flag, or from ``dataset`` via :data:`DATASET_METRICS` (substring match otherwise).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

from nexus_sidecar.evals.tasks import Sample

METRICS = ("match_all", "match_any", "exact", "f1", "rouge_l")

# LongBench's own metric choice per dataset (qa_f1 / rouge / classification-as-match).
DATASET_METRICS = {
    "narrativeqa": "f1", "qasper": "f1", "multifieldqa_en": "f1", "hotpotqa": "f1", "2wikimqa": "f1",
    "musique": "f1", "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l",
    "samsum": "rouge_l", "trec": "match_any", "triviaqa": "f1", "passage_retrieval_en": "match_any",
    "passage_count": "exact", "lcc": "rouge_l", "repobench-p": "rouge_l",
}  # fmt: skip

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, answer: str) -> float:
    """Token-level F1 of two texts after :func:`normalize_text`."""
    p, a = normalize_text(prediction).split(), normalize_text(answer).split()
    common = sum((Counter(p) & Counter(a)).values())
    if not p or not a or common == 0:
        return float(p == a)  # both empty counts as a match; one empty never does
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)


def _lcs(x: list[str], y: list[str]) -> int:
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, answer: str) -> float:
    """ROUGE-L F-measure (beta = 1) over normalised tokens."""
    p, a = normalize_text(prediction).split(), normalize_text(answer).split()
    if not p or not a:
        return float(p == a)
    lcs = _lcs(p, a)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(a)
    return 2 * precision * recall / (precision + recall)


def score(metric: str, prediction: str, answers: list[str]) -> float:
    """Score ``prediction`` against the gold ``answers`` with ``metric`` (see the module docstring)."""
    if not answers:
        raise ValueError("no gold answers to score against")
    pred = normalize_text(prediction)
    golds = [normalize_text(a) for a in answers]
    if metric == "match_all":
        return sum(g in pred for g in golds) / len(golds)
    if metric == "match_any":
        return float(any(g in pred for g in golds))
    if metric == "exact":
        return float(any(g == pred for g in golds))
    if metric == "f1":
        return max(token_f1(prediction, a) for a in answers)
    if metric == "rouge_l":
        return max(rouge_l(prediction, a) for a in answers)
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def load_longbench(
    path: Path, metric: str | None = None, max_new_tokens: int = 32, limit: int | None = None
) -> list[Sample]:
    """Read a LongBench-format JSONL file into samples (task name = ``dataset`` field or the file stem).

    Raises ``ValueError`` naming the line and field for malformed records.
    """
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if not path.is_file():
        raise FileNotFoundError(f"--dataset-file {path}: no such file")
    samples: list[Sample] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for fld, typ in (("context", str), ("input", str), ("answers", list)):
                if not isinstance(rec.get(fld), typ):
                    got = repr(rec.get(fld))[:60]
                    raise ValueError(f"{path}:{lineno}: field {fld!r} must be a {typ.__name__}, got {got}")
            answers = rec["answers"]
            if not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{path}:{lineno}: 'answers' must be a non-empty list of strings")
            task = str(rec.get("dataset") or path.stem)
            m = metric or DATASET_METRICS.get(task, "match_any")
            sid = f"{task}/{rec.get('_id', lineno)}"
            question = f"Answer the question based on the text above.\nQuestion: {rec['input']}"
            samples.append(Sample(task, sid, rec["context"], question, tuple(answers), m, max_new_tokens, "Answer:"))
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise ValueError(f"{path}: no records")
    return samples
