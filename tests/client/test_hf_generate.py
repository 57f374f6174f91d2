"""Generation with the in-process engine on a tiny random Llama: budget held, evictions made."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from nexus_client.hf.backends import LocalBackend, PolicyBackend
from nexus_client.hf.cache_surgery import cache_lengths
from nexus_client.hf.generate import generate

from tests.client.conftest import tiny_llama

PROMPT = [int(x) for x in torch.randint(3, 128, (70,), generator=torch.Generator().manual_seed(5))]


@pytest.fixture(scope="module")
def tiny() -> transformers.LlamaForCausalLM:
    return tiny_llama(512)


def _cfg(**kw):
    base = dict(policy="nexus", budget=24, slack=0, sinks=2, recent=4, groups=1, fanout=4, seed=7)
    base.update(kw)
    return base


def test_local_backend_satisfies_protocol() -> None:
    assert isinstance(LocalBackend(), PolicyBackend)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(("every_k", "slack"), [(1, 0), (4, 3)])
def test_cache_bounded_and_evicts(tiny, groups: int, every_k: int, slack: int) -> None:
    backend = LocalBackend()
    res = generate(
        tiny, None, PROMPT, backend, _cfg(groups=groups, slack=slack),
        max_new_tokens=40, every_k=every_k, chunk_size=16,
    )  # fmt: skip
    assert len(res.token_ids) == 40
    assert res.evictions, "a 70-token prompt under a 24-token budget must evict"
    assert all(size <= 24 + slack for size in res.timings["cache_after_call"])
    # Between calls the cache grows by at most every_k tokens (or one prefill chunk).
    assert max(size for _, size in res.cache_sizes_over_time) <= 24 + max(slack + 1, 16)
    # Prefill already streamed under the budget: no prefill call left more than budget + slack.
    prefill_sizes = [size for step, size in res.cache_sizes_over_time if step < 0]
    assert len(prefill_sizes) == 5 and max(prefill_sizes) <= 24 + slack
    if every_k > 1:
        assert res.policy_calls < 5 + 39  # fewer calls than decode steps
    evicted = [p for ev in res.evictions for p in ev.positions[0]]
    assert len(evicted) == len(set(evicted)), "a position is evicted at most once"
    assert all(p >= 2 for p in evicted), "sinks are protected"


def test_same_seed_same_output_and_evictions(tiny) -> None:
    runs = [
        generate(tiny, None, PROMPT, LocalBackend(), _cfg(), max_new_tokens=20, every_k=2, chunk_size=32)
        for _ in range(2)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert [(e.step, e.positions) for e in runs[0].evictions] == [(e.step, e.positions) for e in runs[1].evictions]


@torch.inference_mode()
def test_no_eviction_equals_dense_greedy(tiny) -> None:
    """With a budget above the sequence length the loop is plain greedy decoding."""
    res = generate(tiny, None, PROMPT, LocalBackend(), _cfg(budget=200), max_new_tokens=15, chunk_size=32)
    assert not res.evictions
    dense = tiny.generate(torch.tensor([PROMPT]), max_new_tokens=15, do_sample=False, pad_token_id=0)
    assert res.token_ids == dense[0, len(PROMPT) :].tolist()


def test_bad_arguments(tiny) -> None:
    with pytest.raises(ValueError, match="groups'\\] must be 1 or the model's 2 layers"):
        generate(tiny, None, PROMPT, LocalBackend(), _cfg(groups=3), max_new_tokens=2)
    with pytest.raises(ValueError, match="every_k >= 1"):
        generate(tiny, None, PROMPT, LocalBackend(), _cfg(), every_k=0)
    with pytest.raises(ValueError, match="text prompt needs a tokenizer"):
        generate(tiny, None, "hello", LocalBackend(), _cfg())


def test_cache_lengths_helper_rejects_non_cache() -> None:
    with pytest.raises(TypeError, match=r"expected a transformers 5\.x DynamicCache"):
        cache_lengths(object())
