"""A tiny random Llama and a word-level tokenizer: exercises the eval loop without any real model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch


@dataclass
class _Encoded:
    input_ids: list[int]


class WordTokenizer:
    """Whitespace tokenizer over a growing vocabulary (ids 3..); 2 is EOS. Enough for prompt building."""

    eos_token_id = 2
    bos_token_id = None
    chat_template = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.to_id: dict[str, int] = {}
        self.to_word: dict[int, str] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> _Encoded:
        ids = []
        for w in text.split():
            if w not in self.to_id:
                i = 3 + len(self.to_id) % (self.vocab_size - 3)
                self.to_id[w] = i
                self.to_word.setdefault(i, w)
            ids.append(self.to_id[w])
        return _Encoded(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(self.to_word.get(i, "?") for i in ids)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, WordTokenizer]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    return model, WordTokenizer(512)
