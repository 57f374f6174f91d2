"""Task generators: deterministic, answers present in the context, splits disjoint, lengths honoured."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from nexus_sidecar.evals.haystacks import NOISE_SENTENCES, haystack_digest, haystack_sentences, stdlib_sentences
from nexus_sidecar.evals.tasks import BASE_TASKS, approx_tokens, generate_sample, generate_samples, parse_task

ALL = [*BASE_TASKS, "passkey-stdlib", "multikey-stdlib", "vartrack-stdlib"]


@pytest.mark.parametrize("task", ALL)
def test_deterministic_and_answers_in_context(task: str) -> None:
    for i in range(4):
        a = generate_sample(task, 512, "dev", i)
        b = generate_sample(task, 512, "dev", i)
        assert a == b
        assert a.answers and all(ans in a.context for ans in a.answers)
        assert a.question not in a.context and a.metric == "match_all" and a.max_new_tokens >= 8


@pytest.mark.parametrize("task", ALL)
def test_splits_and_indices_differ(task: str) -> None:
    dev = {generate_sample(task, 512, "dev", i).context for i in range(4)}
    test = {generate_sample(task, 512, "test", i).context for i in range(4)}
    assert len(dev) == 4 and len(test) == 4 and not dev & test


@pytest.mark.parametrize("length", [256, 512, 1024])
@pytest.mark.parametrize("task", ["passkey", "multiquery", "cwe", "passkey-stdlib"])
def test_length_is_close_to_target(task: str, length: int) -> None:
    n = approx_tokens(generate_sample(task, length, "test", 0).context)
    assert 0.8 * length <= n <= 1.3 * length


def test_passkey_needle_appears_once_and_number_is_five_digits() -> None:
    s = generate_sample("passkey", 512, "test", 3)
    (key,) = s.answers
    assert re.fullmatch(r"\d{5}", key)
    assert s.context.count(f"The pass key is {key}.") == 1
    assert s.answer_prefix == "The pass key is"


def test_multikey_asks_two_keys_and_keeps_two_distractors() -> None:
    s = generate_sample("multikey", 512, "test", 0)
    assert len(re.findall(r"special magic numbers for [a-z]+-[a-z]+ is: \d{5}", s.context)) == 4
    distractors = {str(d) for d in s.meta["distractors"]}  # type: ignore[union-attr]
    assert len(s.questions) == 2 and len(distractors) == 2
    for q in s.questions:  # each question names its own key, whose value is its answer and no distractor
        key = re.search(r"number for ([a-z]+-[a-z]+) mentioned", q.question).group(1)  # type: ignore[union-attr]
        assert f"for {key} is: {q.answers[0]}." in s.context and q.answers[0] not in distractors
        assert key in q.answer_prefix
    assert s.questions[0].answers != s.questions[1].answers


def test_multiquery_is_one_question_per_key() -> None:
    s = generate_sample("multiquery", 512, "test", 2)
    assert len(s.questions) == 3 and len({q.answers for q in s.questions}) == 3
    assert all(len(q.answers) == 1 and q.answers[0] in s.context for q in s.questions)


def test_vartrack_chain_is_ordered_and_bridges() -> None:
    s = generate_sample("vartrack", 512, "test", 1)
    a, b, c = s.meta["chain"]  # type: ignore[misc]
    i0 = s.context.index(f"VAR {a} = {s.answers[0]}.")
    i1 = s.context.index(f"VAR {b} = VAR {a}.")
    i2 = s.context.index(f"VAR {c} = VAR {b}.")
    assert i0 < i1 < i2
    assert c in s.question and a not in s.question and b not in s.question  # the middle link is a bridge


def test_cwe_answers_are_the_most_common_words() -> None:
    s = generate_sample("cwe", 512, "test", 2)
    words = re.findall(r"\d+\. ([a-z]+)", s.context)
    counts = Counter(words)
    top = {w for w, _ in counts.most_common(3)}
    assert top == set(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_stdlib_haystack_is_prose_without_digits() -> None:
    sents = stdlib_sentences()
    assert len(sents) >= 50 and not any(re.search(r"\d", x) for x in sents)
    assert len(haystack_digest("stdlib")) == 16 and haystack_digest("noise") != haystack_digest("stdlib")
    out = haystack_sentences("noise", 40, approx_tokens, start=2)
    assert out[0] == NOISE_SENTENCES[2] and sum(approx_tokens(" " + x) for x in out) >= 40


def test_parse_task_and_errors() -> None:
    assert parse_task("passkey") == ("passkey", "noise")
    assert parse_task("vartrack-stdlib") == ("vartrack", "stdlib")
    with pytest.raises(ValueError, match="unknown task"):
        parse_task("needle")
    with pytest.raises(ValueError, match="unknown haystack"):
        parse_task("passkey-wiki")
    with pytest.raises(ValueError, match="split"):
        generate_sample("passkey", 512, "train", 0)
    with pytest.raises(ValueError, match="length"):
        generate_sample("passkey", 10, "dev", 0)


def test_generate_samples_is_task_major() -> None:
    out = generate_samples(["passkey", "cwe"], 256, "dev", 2)
    assert [s.task for s in out] == ["passkey", "passkey", "cwe", "cwe"]
    assert [s.sample_id for s in out][:2] == ["passkey/256/dev/0", "passkey/256/dev/1"]


def test_samples_do_not_depend_on_the_process_hash_seed() -> None:
    """Same (task, length, split, index) -> same text in every process (keys were once drawn from a
    set, whose order follows PYTHONHASHSEED: each process then asked about different keys)."""
    import os
    import subprocess
    import sys

    code = ("import hashlib; from nexus_sidecar.evals.tasks import generate_samples as g; "
            "s = g(['passkey', 'multikey', 'multivalue', 'multiquery', 'vartrack', 'cwe', 'turnkeys'], 512, 'test', "
            "2); "
            "print(hashlib.sha256(repr([(x.context, [(q.question, q.answers) for q in x.questions]) "
            "for x in s]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout for seed in ("0", "1", "2")}
    assert len(digests) == 1, digests
