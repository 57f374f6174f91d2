"""Parity of the llama.cpp worker with the transformers path on SmolLM2, same token ids, same policy.

Both run the prompt in the same chunks under the in-process engine; the summaries each sends are
recorded (the engine itself decides) and compared call by call while the retained slots are the
same. Tolerance: llama.cpp's Q4_1 x Q8_1 kernels against transformers' float32 on the de-quantised
weights (test_llamacpp_capture.py: q/k within 2.5 %): max |attn difference| / max attn below 5 %,
every prior within 5 % of its range. Both sides build the summary with the same function
(:func:`nexus_client.summary.summarize`); only the q/k/v differ. Decisions are compared too.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.client.conftest import FILLER, passkey_prompt, require_smollm2

require_smollm2()

from nexus_client.hf import LocalBackend, generate, load_model  # noqa: E402
from nexus_client.llamacpp import LlamaModel, LlamaWorker, resolve_gguf  # noqa: E402

CHUNK = 32
CFG = dict(policy="nexus", budget=64, slack=0, sinks=4, recent=8, groups=1, seed=1)


class Recording(LocalBackend):
    """The in-process engine, keeping every summary it is sent (real decisions, nothing faked)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list = []
        self.answers: list = []

    def step_many(self, sessions, tensors):
        out = super().step_many(sessions, tensors)
        self.sent += list(tensors)
        self.answers += [[e.tolist() for e in d.evicted] for d in out]
        return out


def _scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.slow
def test_summaries_and_decisions_match_transformers() -> None:
    hf = load_model("smollm2")
    ids = hf.tokenizer(passkey_prompt(4417, FILLER[0], 12)).input_ids
    assert len(ids) > 3 * CFG["budget"]
    ref = Recording()
    generate(hf.model, hf.tokenizer, ids, ref, CFG, max_new_tokens=1, chunk_size=CHUNK, stop_at_eos=False)
    got = Recording()
    with LlamaModel(resolve_gguf("smollm2"), n_ctx=512, n_seq=1, n_batch=CHUNK, threads=1) as lm:
        LlamaWorker(lm, got, CFG, chunk_size=CHUNK).generate([ids], 1, stop_at_eos=False)
    calls = -(-len(ids) // CHUNK)
    assert len(ref.sent) == len(got.sent) == calls
    same_calls = overlap = union = 0
    diverged = False
    for r, g, ra, ga in zip(ref.sent, got.sent, ref.answers, got.answers, strict=True):
        assert torch.equal(r.new_positions, g.new_positions)
        if not diverged:  # the same slots on both engines so far: the summaries must agree
            assert r.attn.shape == g.attn.shape
            assert _scaled_diff(g.attn, r.attn) < 0.05
            assert _scaled_diff(g.last, r.last) < 0.05
            for name, prior in r.priors.items():
                spread = float(prior.max() - prior.min())
                assert float((g.priors[name] - prior).abs().max()) < 0.05 * spread, name
            same_calls += ga == ra
        gone_r, gone_g = set(ra[0]), set(ga[0])
        overlap += len(gone_r & gone_g)
        union += len(gone_r | gone_g)
        diverged = diverged or gone_r != gone_g
    # Different kernels (Q4_1 x Q8_1 against float32) make near-ties flip: measured, the first 6
    # calls identical, then one position of ~24 swapped; over the prompt the evicted sets overlap
    # by far more than 80 %.
    assert same_calls >= 3
    assert overlap / union > 0.8, (overlap, union)
