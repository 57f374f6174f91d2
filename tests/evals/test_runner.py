"""The eval loop on a tiny random Llama: budgets hold, runs are recorded once, a restart resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nexus_client.hf import LocalBackend
from nexus_sidecar.evals.driver import drive, kv_bytes_per_token, prefill
from nexus_sidecar.evals.runner import (
    EvalSettings,
    PolicySpec,
    expand_runs,
    iter_eval,
    key_label,
    load_done,
    prompt_segments,
    run_key,
)
from nexus_sidecar.evals.tasks import generate_samples

SETTINGS = EvalSettings(model="tiny", chunk_size=16, chat=False, base_knobs={"sinks": 2, "recent": 4})
RUNS = expand_runs([PolicySpec.parse(p) for p in ("dense", "tova", "nexus:pool=3")], [0.8],
                   ["streaming", "agnostic", "aware"])  # fmt: skip


class CountingFactory:
    """Backend factory that counts how many runs asked for a backend."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self) -> LocalBackend:
        self.calls += 1
        if self.fail:
            raise AssertionError("a finished run was recomputed")
        return LocalBackend()


def _samples() -> list[Any]:
    return generate_samples(["passkey", "vartrack"], 64, "dev", 2)


def test_policy_spec_parsing() -> None:
    spec = PolicySpec.parse("nexus:tau=inf:pool=5")
    assert spec.name == "nexus" and dict(spec.knobs) == {"pool": 5, "tau": float("inf")}
    assert spec.label == "nexus:pool=5:tau=inf"
    for bad in ("nexus:pool", "nexus:pool=x", ":pool=3"):
        with pytest.raises(ValueError):
            PolicySpec.parse(bad)
    # Word values reach enum knobs; every knob is checked against PolicyConfig before any run.
    assert dict(PolicySpec.parse("nexus:attn_reduce=mean").knobs) == {"attn_reduce": "mean"}
    for bad, field in (("nexus:attn_reduce=avg", "attn_reduce"), ("nexus:pool=4", "pool"), ("tova:colour=1", "colour")):
        with pytest.raises(ValueError, match=field):
            PolicySpec.parse(bad)
    assert [(r.policy.name, r.eviction, r.mode) for r in RUNS][:2] == [
        ("dense", 0.0, "dense"),
        ("tova", 0.8, "streaming"),
    ]
    with pytest.raises(ValueError, match="eviction"):
        expand_runs([PolicySpec("tova")], [1.0], ["agnostic"])
    with pytest.raises(ValueError, match="mode"):
        expand_runs([PolicySpec("tova")], [0.8], ["oneshot"])
    # kvpress presses: their own knobs are checked against the press's fields; no streaming runs.
    spec = PolicySpec.parse("kvpress:snapkv:window_size=16")
    assert spec.name == "kvpress:snapkv" and spec.label == "kvpress:snapkv:window_size=16"
    for bad, word in (("kvpress:snapkv:colour=1", "colour"), ("kvpress:nope", "nope")):
        with pytest.raises(ValueError, match=word):
            PolicySpec.parse(bad)
    modes = [r.mode for r in expand_runs([spec], [0.5, 0.8], ["streaming", "agnostic", "aware", "decode"])]
    assert modes == ["agnostic", "aware", "agnostic", "aware"]


def test_settings_hold_their_budgets_and_the_shared_prefix_changes_nothing(tiny: Any) -> None:
    model, tok = tiny
    s = _samples()[0]
    ctx, qs = prompt_segments(tok, s, chat=False)
    budget = round(0.2 * len(ctx))
    cfg = {"policy": "tova", "budget": budget, "sinks": 2, "recent": 4}
    stream = drive(model, tok, ctx, qs, s.max_new_tokens, setting="streaming", backend=LocalBackend(),
                   policy_config=cfg, chunk_size=16)  # fmt: skip
    assert stream.kept_context <= budget < stream.peak_cache and stream.evicted > 0
    assert stream.policy_calls == -(-len(ctx) // 16)  # one call per context chunk, none after
    plain = drive(model, tok, ctx, qs, s.max_new_tokens, setting="agnostic", backend=LocalBackend(), policy_config=cfg)
    shared = drive(model, tok, ctx, qs, s.max_new_tokens, setting="agnostic", backend=LocalBackend(),
                   policy_config=cfg, prefix=prefill(model, ctx))  # fmt: skip
    assert [a.token_ids for a in shared.answers] == [a.token_ids for a in plain.answers]
    assert shared.kept_context == plain.kept_context == budget and shared.peak_cache == plain.peak_cache
    assert shared.answers[0].retained == plain.answers[0].retained and len(plain.answers[0].retained) == budget
    aware_budget = round(0.2 * (len(ctx) + len(qs[0])))
    aware = drive(model, tok, ctx, qs, s.max_new_tokens, setting="aware", backend=LocalBackend(),
                  policy_config={**cfg, "budget": aware_budget})  # fmt: skip
    assert aware.kept_context == aware_budget and aware.policy_calls == len(qs)
    # decode: the aware compression, then one call per generated token that needs a forward pass,
    # so the cache never holds more than budget + 1 (the token just fed) while the answer is written.
    decode = drive(model, tok, ctx, qs, 6, setting="decode", backend=LocalBackend(),
                   policy_config={**cfg, "budget": aware_budget, "slack": 0})  # fmt: skip
    fed = sum(max(len(a.token_ids) - 1, 0) for a in decode.answers)
    assert decode.policy_calls == len(qs) + fed and fed > 0
    assert decode.peak_cache <= max(len(ctx) + len(q) for q in qs)  # the prompt's prefill is the peak
    assert decode.evicted == aware.evicted + fed
    with pytest.raises(ValueError, match="decode"):
        drive(model, tok, ctx, qs, 2, setting="decode", press=object())
    dense = drive(model, tok, ctx, qs, s.max_new_tokens, setting="dense")
    assert dense.evicted == 0 and dense.policy_calls == 0 and dense.kept_context == len(ctx)
    assert dense.peak_cache == len(ctx) + len(qs[0]) + len(dense.answers[0].token_ids) - 1
    # 2 layers x (K and V) x 2 kv heads x head_dim 8 x 4 bytes (float32)
    assert kv_bytes_per_token(model) == 2 * 2 * 2 * 8 * 4
    with pytest.raises(ValueError, match="prefix ids"):
        drive(model, tok, qs[0], [ctx], 2, setting="dense", prefix=prefill(model, ctx))
    with pytest.raises(ValueError, match="exactly one"):
        drive(model, tok, ctx, qs, 2, setting="agnostic")


def test_each_question_is_answered_from_the_same_compressed_context(tiny: Any) -> None:
    """Several questions: no question sees another's tokens, so order and company change no answer."""
    model, tok = tiny
    s = generate_samples(["multiquery"], 64, "dev", 1)[0]
    ctx, qs = prompt_segments(tok, s, chat=False)
    assert len(qs) == 3 and len({tuple(q) for q in qs}) == 3
    cfg = {"policy": "snapkv", "budget": round(0.5 * len(ctx)), "sinks": 2, "recent": 4}
    for setting in ("streaming", "agnostic", "aware"):
        run = {"setting": setting, "backend": LocalBackend(), "policy_config": cfg, "chunk_size": 16}
        together = drive(model, tok, ctx, qs, 4, **run)
        alone = drive(model, tok, ctx, qs[2:], 4, **run)
        reverse = drive(model, tok, ctx, qs[::-1], 4, **run)
        assert together.answers[2].token_ids == alone.answers[0].token_ids == reverse.answers[0].token_ids, setting
        assert together.answers[0].token_ids == reverse.answers[2].token_ids, setting


def test_runs_are_recorded_and_a_restart_skips_them(tiny: Any, tmp_path: Path) -> None:
    model, tok = tiny
    path = tmp_path / "out.jsonl"
    samples = _samples()
    factory = CountingFactory()
    first = list(iter_eval(model, tok, samples, RUNS, SETTINGS, factory, path, progress=False))
    n_runs = len(samples) * len(RUNS)
    assert len(first) == n_runs and factory.calls == len(samples) * (len(RUNS) - 1)  # dense needs no backend
    lines = path.read_text().splitlines()
    assert len(lines) == n_runs and len(load_done(path)) == n_runs
    for rec in first:
        assert 0.0 <= rec["score"] <= 1.0
        assert rec["length"] == rec["context_tokens"] and rec["questions"] == len(rec["scores"]) >= 1
        if rec["policy"] != "dense":
            compressed = rec["context_tokens"] + (rec["question_tokens"] if rec["mode"] == "aware" else 0)
            assert rec["kept_context"] <= rec["budget"] == round(0.2 * compressed)
            assert rec["peak_kv_bytes"] < rec["dense_kv_bytes"]
    # Restart: nothing is recomputed, and the records come back identical.
    again = list(iter_eval(model, tok, samples, RUNS, SETTINGS, CountingFactory(fail=True), path, progress=False))
    assert again == first

    # Simulate a kill mid-write: drop the last two lines, leave a torn one. Only those runs are redone.
    path.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][: len(lines[-2]) // 2])
    redo = CountingFactory()
    third = list(iter_eval(model, tok, samples, RUNS, SETTINGS, redo, path, progress=False))
    assert redo.calls == 2
    assert [(r["key"], r["output"], r["score"]) for r in third] == [(r["key"], r["output"], r["score"]) for r in first]
    assert len(load_done(path)) == n_runs


def test_settings_change_the_key(tiny: Any) -> None:
    s = _samples()[0]
    other = EvalSettings(model="tiny", chunk_size=32, chat=False, base_knobs={"sinks": 2, "recent": 4})
    assert run_key(SETTINGS, s, RUNS[1]) != run_key(other, s, RUNS[1])
    assert run_key(SETTINGS, s, RUNS[1]) != run_key(SETTINGS, s, RUNS[2])


def test_a_moved_default_never_reuses_runs_of_the_old_one(tiny: Any, tmp_path: Path) -> None:
    """``nexus`` and ``nexus:gamma=<today's default>`` are one run, keyed as the latter;
    ``nexus:gamma=0.95`` is keyed as the runs logged as ``nexus`` before the default moved."""
    from nexus_sidecar.engine.config import PolicyConfig

    g = f"gamma={PolicyConfig(budget=8).gamma:g}"
    assert g != "gamma=0.95"
    spellings = {t: key_label(PolicySpec.parse(t)) for t in
                 ("nexus", f"nexus:{g}", "nexus:gamma=0", "nexus:gamma=0.0", "nexus:gamma=0.95", "nexus_topk:seed=1",
                  "tova")}
    assert spellings == {"nexus": f"nexus:{g}", f"nexus:{g}": f"nexus:{g}", "nexus:gamma=0": "nexus:gamma=0",
                         "nexus:gamma=0.0": "nexus:gamma=0", "nexus:gamma=0.95": "nexus",
                         "nexus_topk:seed=1": f"nexus_topk:{g}:seed=1", "tova": "tova"}
    model, tok = tiny
    path, samples = tmp_path / "out.jsonl", _samples()[:1]
    explicit = expand_runs([PolicySpec.parse(f"nexus:{g}")], [0.8], ["streaming"])
    first = list(iter_eval(model, tok, samples, explicit, SETTINGS, CountingFactory(), path, progress=False))
    default = expand_runs([PolicySpec.parse("nexus")], [0.8], ["streaming"])
    again = list(iter_eval(model, tok, samples, default, SETTINGS, CountingFactory(fail=True), path, progress=False))
    assert again == [{**first[0], "policy": "nexus", "knobs": {}}]  # reused, relabelled as asked
    # A run logged before the default moved (key spelling ``nexus``, gamma 0.95) is reused by
    # ``nexus:gamma=0.95`` and never by today's ``nexus``.
    old = list(iter_eval(model, tok, samples, expand_runs([PolicySpec.parse("nexus:gamma=0.95")], [0.8], ["streaming"]),
                         SETTINGS, CountingFactory(), path, progress=False))
    assert "|nexus|" in old[0]["key"] and old[0]["key"] != first[0]["key"]
    redo = CountingFactory(fail=True)
    assert list(iter_eval(model, tok, samples, default, SETTINGS, redo, path, progress=False)) == again


def test_budget_below_protected_window_is_a_precise_error(tiny: Any, tmp_path: Path) -> None:
    model, tok = tiny
    tight = EvalSettings(model="tiny", chunk_size=16, chat=False, base_knobs={"sinks": 16, "recent": 64})
    runs = expand_runs([PolicySpec("tova")], [0.9], ["agnostic"])
    with pytest.raises(ValueError, match="not above sinks \\+ recent"):
        list(
            iter_eval(model, tok, _samples()[:1], runs, tight, CountingFactory(), tmp_path / "x.jsonl", progress=False)
        )


def test_results_file_is_plain_jsonl(tiny: Any, tmp_path: Path) -> None:
    model, tok = tiny
    path = tmp_path / "r.jsonl"
    runs = expand_runs([PolicySpec("random")], [0.8], ["streaming"])
    list(iter_eval(model, tok, _samples()[:1], runs, SETTINGS, CountingFactory(), path, progress=False))
    rec = json.loads(path.read_text())
    assert rec["policy"] == "random" and rec["mode"] == "streaming" and rec["policy_calls"] >= 2


def test_report_only_yields_complete_samples_and_computes_nothing(tiny: Any, tmp_path: Path) -> None:
    model, tok = tiny
    path = tmp_path / "p.jsonl"
    samples = _samples()
    list(iter_eval(model, tok, samples[:1], RUNS, SETTINGS, CountingFactory(), path, progress=False))
    # Finish only part of the second sample: it must be left out of the report.
    list(iter_eval(model, tok, samples[1:2], RUNS[:2], SETTINGS, CountingFactory(), path, progress=False))
    got = list(iter_eval(model, tok, samples, RUNS, SETTINGS, CountingFactory(fail=True), path, progress=False,
                         report_only=True))  # fmt: skip
    assert {r["sample_id"] for r in got} == {samples[0].sample_id} and len(got) == len(RUNS)


def test_remote_sidecar_gives_the_same_records_as_in_process(tiny: Any, tmp_path: Path) -> None:
    """``--sidecar``: the same runs through a real sidecar process give identical outputs and evictions."""
    from nexus_client.hf.remote import RemoteBackend
    from nexus_sidecar.bench.procs import sidecar_process

    model, tok = tiny
    samples = generate_samples(["passkey"], 64, "dev", 1)
    runs = expand_runs([PolicySpec.parse(p) for p in ("tova", "nexus")], [0.8], ["streaming"])
    local = list(iter_eval(model, tok, samples, runs, SETTINGS, CountingFactory(), tmp_path / "a.jsonl",
                           progress=False))
    with sidecar_process() as sc:
        remote = RemoteBackend(sc.target)
        try:
            far = list(iter_eval(model, tok, samples, runs, SETTINGS, lambda: remote, tmp_path / "b.jsonl",
                                 progress=False))
        finally:
            remote.shutdown()
    assert remote.calls > 0, "the policy calls went to the sidecar"
    keys = ("key", "output", "score", "evicted", "peak_cache", "kept_context", "policy_calls")
    assert [tuple(r[k] for k in keys) for r in far] == [tuple(r[k] for k in keys) for r in local]
    assert all(r["evicted"] > 0 for r in local)


def _fast_word_tokenizer(samples: list[Any]) -> Any:
    """A real ``tokenizers`` fast tokenizer (word level; gives character offsets) over the samples' words."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in samples for q in s.questions for text in (s.context, q.question, q.answer_prefix)
                    for w in re.findall(r"\w+|[^\w\s]+", text)})  # fmt: skip
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    assert len(vocab) < 512  # the tiny model's vocabulary
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]")


def test_answer_tokens_kept_measures_the_evidence_left_at_question_time(tiny: Any) -> None:
    from nexus_sidecar.evals.runner import answer_positions, run_one

    model, word_tok = tiny
    samples = generate_samples(["passkey", "vartrack"], 64, "dev", 1)
    tok = _fast_word_tokenizer(samples)
    for sample in samples:
        ctx, q = prompt_segments(tok, sample, chat=False)
        pos = answer_positions(tok, sample, ctx, chat=False)
        assert pos, sample.sample_id
        # The marked tokens are exactly the answer's occurrences (passkey: the key is written twice).
        found = tok.decode([ctx[p] for p in pos]).split()
        assert set(found) == set(sample.answers) and len(found) == sample.context.count(sample.answers[0])
        dense, evicting = (run_one(model, tok, sample, r, SETTINGS, LocalBackend, (ctx, q))
                           for r in (RUNS[0], RUNS[1]))  # fmt: skip
        assert dense["answer_tokens"] == len(pos) and dense["answer_kept"] == 1.0
        assert evicting["answer_tokens"] == len(pos) and 0.0 <= evicting["answer_kept"] <= 1.0
    # A tokenizer without character offsets gets no number rather than a made-up one.
    ctx, q = prompt_segments(word_tok, samples[0], chat=False)
    assert answer_positions(word_tok, samples[0], ctx, chat=False) is None
    rec = run_one(model, word_tok, samples[0], RUNS[1], SETTINGS, LocalBackend, (ctx, q))
    assert rec["answer_tokens"] is None and rec["answer_kept"] is None


def test_with_seeds_adds_seed_copies_of_sampled_policies_only() -> None:
    from nexus_sidecar.evals.runner import with_seeds

    specs = [PolicySpec.parse(x) for x in ("nexus:tau=4", "tova", "nexus_topk", "random", "nexus:seed=5", "dense")]
    labels = [p.label for p in with_seeds(specs, 3)]
    assert labels == ["nexus:tau=4", "nexus:seed=1:tau=4", "nexus:seed=2:tau=4", "tova", "nexus_topk", "random",
                      "random:seed=1", "random:seed=2", "nexus:seed=5", "dense"]
    assert with_seeds(specs, 1) == specs


def test_pipelined_streaming_and_decode_hold_their_bounds_and_keep_blocking_keys(tiny: Any) -> None:
    """--pipeline: the streaming context and the decode answer overlap one call; the question still
    sees the compressed context; blocking runs keep the run keys they had before the knob."""
    model, tok = tiny
    s = _samples()[0]
    ctx, qs = prompt_segments(tok, s, chat=False)
    budget = round(0.2 * len(ctx))
    cfg = {"policy": "tova", "budget": budget, "sinks": 2, "recent": 4}
    block = drive(model, tok, ctx, qs, s.max_new_tokens, setting="streaming", backend=LocalBackend(),
                  policy_config=cfg, chunk_size=16)  # fmt: skip
    pipe = drive(model, tok, ctx, qs, s.max_new_tokens, setting="streaming", backend=LocalBackend(),
                 policy_config=cfg, chunk_size=16, pipeline=True)  # fmt: skip
    assert pipe.kept_context == block.kept_context == budget  # drained before the question
    assert pipe.policy_calls == block.policy_calls and pipe.evicted == block.evicted
    assert block.peak_cache <= budget + 16 < pipe.peak_cache <= budget + 2 * 16  # one chunk more in flight
    aware_budget = round(0.2 * (len(ctx) + len(qs[0])))
    dec = drive(model, tok, ctx, qs, 6, setting="decode", backend=LocalBackend(),
                policy_config={**cfg, "budget": aware_budget, "slack": 0}, pipeline=True)  # fmt: skip
    assert dec.kept_context == aware_budget and dec.answers and dec.policy_calls > len(qs)
    assert EvalSettings(model="m").fingerprint() != EvalSettings(model="m", pipeline=True).fingerprint()
    assert EvalSettings(model="m").fingerprint() == EvalSettings(model="m", pipeline=False).fingerprint()


def test_llamacpp_weights_are_part_of_run_keys() -> None:
    """The GGUF encoding llama.cpp ran changes a run's key; transformers keys are untouched by it."""
    lc = [EvalSettings(model="m", engine="llamacpp", weights=w).fingerprint() for w in ("f16", "shipped", "f16")]
    assert lc[0] != lc[1] and lc[0] == lc[2]
    assert EvalSettings(model="m").fingerprint() == EvalSettings(model="m", weights=None).fingerprint()
