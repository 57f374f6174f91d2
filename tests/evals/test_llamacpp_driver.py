"""The evaluation's settings inside llama.cpp (``eval --engine llamacpp``) on the real SmolLM2 GGUF.

A short pass-key context (same token ids as the transformers path) in every setting: the answer,
the cache sizes read from llama.cpp (the branch of each question shares the compressed context's
cells), and the refusals.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.client.conftest import FILLER, passkey_prompt, require_smollm2

require_smollm2()

from nexus_client.hf import LocalBackend, load_model  # noqa: E402
from nexus_client.llamacpp import LlamaModel, resolve_gguf  # noqa: E402
from nexus_sidecar.evals.llamacpp_driver import drive_llamacpp  # noqa: E402

BUDGET, CHUNK = 96, 32


@pytest.fixture(scope="module")
def tok():
    return load_model("smollm2").tokenizer


@pytest.fixture(scope="module")
def lm():
    model = LlamaModel(resolve_gguf("smollm2"), n_ctx=1024, n_seq=2, n_batch=512, threads=1)
    yield model
    model.close()


@pytest.mark.parametrize("setting", ["dense", "streaming", "agnostic", "aware", "decode"])
def test_settings_answer_within_llamacpps_cache(tok, lm: LlamaModel, setting: str) -> None:
    text = passkey_prompt(30517, FILLER[1], 40).rsplit("What is", 1)[0]
    ctx = tok(text).input_ids
    questions = [tok(" What is the secret pass key? The pass key is", add_special_tokens=False).input_ids,
                 tok(" Repeat the secret pass key. The pass key is", add_special_tokens=False).input_ids]
    cfg = None if setting == "dense" else dict(policy="nexus", budget=BUDGET, slack=0, sinks=4, recent=16, groups=1)
    res = drive_llamacpp(lm, tok, ctx, questions, 6, setting=setting, backend=None if cfg is None else LocalBackend(),
                         policy_config=cfg, window=16, chunk_size=CHUNK, stop_ids=[tok.eos_token_id])
    assert len(ctx) > 3 * BUDGET
    assert len(res.answers) == 2
    assert all("30517" in a.text for a in res.answers), [a.text for a in res.answers]
    longest_q = max(len(q) for q in questions)
    if setting == "dense":
        assert res.policy_calls == 0 and res.peak_cache >= len(ctx)
        assert res.answers[0].retained == list(range(len(ctx)))
        return
    assert res.evicted > 0
    retained = res.answers[0].retained
    assert retained is not None and len(retained) <= BUDGET
    if setting == "streaming":
        assert res.policy_calls == -(-len(ctx) // CHUNK)
        assert res.peak_cache <= BUDGET + CHUNK + longest_q + 6  # the context's cells + one branch
    if setting == "agnostic":
        assert res.policy_calls == 1 and res.kept_context <= BUDGET
    if setting in ("aware", "decode"):
        assert res.policy_calls >= 2  # one per question (decode: one per generated token too)


@pytest.mark.parametrize("setting", ["streaming", "decode"])
def test_pipelined_settings(tok, lm: LlamaModel, setting: str) -> None:
    """``eval --engine llamacpp --pipeline``: each answer applied right before the next call; the
    last context call's before the questions branch off (the context they see holds the budget)."""
    text = passkey_prompt(30517, FILLER[1], 40).rsplit("What is", 1)[0]
    ctx = tok(text).input_ids
    questions = [tok(" What is the secret pass key? The pass key is", add_special_tokens=False).input_ids]
    cfg = dict(policy="nexus", budget=BUDGET, slack=0, sinks=4, recent=16, groups=1)
    res = drive_llamacpp(lm, tok, ctx, questions, 6, setting=setting, backend=LocalBackend(), policy_config=cfg,
                         window=16, chunk_size=CHUNK, stop_ids=[tok.eos_token_id], pipeline=True)
    assert "30517" in res.answers[0].text, res.answers[0].text
    assert res.evicted > 0 and "wait_s" in res.timings
    if setting == "streaming":
        assert res.policy_calls == -(-len(ctx) // CHUNK)
        assert res.kept_context <= BUDGET  # the last answer was applied before the question
        assert BUDGET + CHUNK < res.peak_cache <= BUDGET + 2 * CHUNK + len(questions[0]) + 6
    else:
        assert res.policy_calls >= 2


def test_refusals(tok, lm: LlamaModel) -> None:
    with pytest.raises(ValueError, match="dense takes no backend"):
        drive_llamacpp(lm, tok, [1, 2, 3], [[4]], 2, setting="dense", backend=LocalBackend(), policy_config={})
    with pytest.raises(ValueError, match="unknown setting"):
        drive_llamacpp(lm, tok, [1, 2, 3], [[4]], 2, setting="oneshot")
