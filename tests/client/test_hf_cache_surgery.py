"""KV-cache surgery: logits on the shortened cache equal the full cache with evicted slots masked.

Runs on a tiny randomly initialised Llama (2 layers, hidden 64, 4 heads, 2 KV heads: grouped-query
attention is exercised) in seconds; no download.
"""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from nexus_client.hf.cache_surgery import apply_keep_mask, cache_lengths
from nexus_client.hf.capture import ATTN_IMPL, QueryRecorder, capture_queries

from tests.client.conftest import tiny_llama

PROMPT_LEN = 24
NEW = 3


@pytest.fixture(scope="module")
def tiny() -> transformers.LlamaForCausalLM:
    return tiny_llama(256)


def _prefill(model, ids):
    cache = transformers.DynamicCache(config=model.config)
    pos = torch.arange(ids.shape[1])[None]
    model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
    return cache


def _masked_reference(model, cache, new_ids, keep_rows):
    """Full cache + explicit additive 4D mask hiding the evicted slots (per layer when rows differ)."""
    n = cache_lengths(cache)[0]
    q = new_ids.shape[1]
    pos = torch.arange(n, n + q)[None]
    masks = []
    for keep in keep_rows:
        allowed = torch.ones(q, n + q, dtype=torch.bool)
        allowed[:, :n] = keep[None, :]
        allowed[:, n:] = torch.tril(torch.ones(q, q, dtype=torch.bool))
        m = torch.zeros(q, n + q).masked_fill(~allowed, float("-inf"))
        masks.append(m[None, None])
    if len(masks) == 1:
        model.set_attn_implementation("eager")
        try:
            return model(input_ids=new_ids, position_ids=pos, past_key_values=cache, attention_mask=masks[0]).logits
        finally:
            model.set_attn_implementation("sdpa")
    # Per-layer masks: the standard mask plumbing passes one mask to every layer, so hand each
    # layer its own through a test-only hook on the attention module read by a wrapper function.
    from nexus_client.hf.capture import attention_modules, nexus_sdpa_forward

    def per_layer(module, query, key, value, attention_mask, **kw):
        return nexus_sdpa_forward(module, query, key, value, module._test_mask > -1, **kw)

    transformers.AttentionInterface.register("test_per_layer_mask", per_layer)
    mods = attention_modules(model)
    for mod, m in zip(mods, masks, strict=True):
        mod._test_mask = m
    model.set_attn_implementation("test_per_layer_mask")
    try:
        return model(input_ids=new_ids, position_ids=pos, past_key_values=cache).logits
    finally:
        model.set_attn_implementation("sdpa")
        for mod in mods:
            del mod._test_mask


def _surgery_logits(model, cache, new_ids, keep, first_pos):
    recorder = QueryRecorder(2)
    apply_keep_mask(cache, keep)
    pos = torch.arange(first_pos, first_pos + new_ids.shape[1])[None]
    with capture_queries(model, recorder):
        assert model.config._attn_implementation == ATTN_IMPL
        return model(input_ids=new_ids, position_ids=pos, past_key_values=cache).logits


@torch.inference_mode()
def test_shared_keep_mask_matches_masked_full_cache(tiny) -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (1, PROMPT_LEN), generator=gen)
    new_ids = torch.randint(0, 128, (1, NEW), generator=gen)
    keep = torch.rand(PROMPT_LEN, generator=gen) > 0.5
    keep[:2] = True
    full = _prefill(tiny, ids)
    short = copy.deepcopy(full)
    ref = _masked_reference(tiny, full, new_ids, [keep])
    got = _surgery_logits(tiny, short, new_ids, keep, PROMPT_LEN)
    assert cache_lengths(short) == [int(keep.sum()) + NEW] * 2
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # Sanity: eviction really changes the output (the test would be vacuous otherwise).
    dense = tiny(
        input_ids=new_ids,
        position_ids=torch.arange(PROMPT_LEN, PROMPT_LEN + NEW)[None],
        past_key_values=_prefill(tiny, ids),
    ).logits
    assert (dense - got).abs().max() > 1e-3


@torch.inference_mode()
def test_decode_steps_after_repeated_surgery(tiny) -> None:
    """Two rounds of eviction with single-token decode in between (q_len = 1, no mask at all)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (1, PROMPT_LEN), generator=gen)
    full = _prefill(tiny, ids)
    short = copy.deepcopy(full)
    alive = torch.ones(PROMPT_LEN, dtype=torch.bool)  # over absolute positions 0..n-1 of the full cache
    n = PROMPT_LEN
    for _ in range(2):
        keep_short = torch.rand(int(alive.sum()), generator=gen) > 0.3
        alive_idx = alive.nonzero().squeeze(1)
        alive[alive_idx[~keep_short]] = False
        tok = torch.randint(0, 128, (1, 1), generator=gen)
        ref = _masked_reference(tiny, full, tok, [alive])
        got = _surgery_logits(tiny, short, tok, keep_short, n)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        alive = torch.cat([alive, torch.tensor([True])])
        n += 1


@torch.inference_mode()
def test_per_layer_keep_masks(tiny) -> None:
    """Each layer evicts different tokens; the query-recording sdpa kernel builds each layer's causal mask."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (1, PROMPT_LEN), generator=gen)
    new_ids = torch.randint(0, 128, (1, NEW), generator=gen)
    keep = torch.rand(2, PROMPT_LEN, generator=gen) > 0.5
    keep[0, -3:] = False  # make the two layers' lengths differ for sure
    keep[1, -3:] = True
    full = _prefill(tiny, ids)
    short = copy.deepcopy(full)
    ref = _masked_reference(tiny, full, new_ids, list(keep))
    apply_keep_mask(short, keep)
    lengths = cache_lengths(short)
    assert lengths == [int(keep[0].sum()), int(keep[1].sum())] and lengths[0] != lengths[1]
    recorder = QueryRecorder(2)
    with capture_queries(tiny, recorder):
        pos = torch.arange(PROMPT_LEN, PROMPT_LEN + NEW)[None]
        got = tiny(input_ids=new_ids, position_ids=pos, past_key_values=short).logits
        fq = recorder.take()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert [tuple(q.shape) for q in fq.queries] == [(4, NEW, 16)] * 2


def test_keep_mask_errors(tiny) -> None:
    with torch.inference_mode():
        cache = _prefill(tiny, torch.randint(0, 128, (1, 8)))
    with pytest.raises(ValueError, match="layer 0: keep row covers 5 slots"):
        apply_keep_mask(cache, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        apply_keep_mask(cache, torch.ones(8))
    with pytest.raises(ValueError, match="3 groups; cache has 2 layers"):
        apply_keep_mask(cache, torch.ones(3, 8, dtype=torch.bool))
    padded = torch.zeros(2, 10, dtype=torch.bool)
    padded[:, :8] = True
    padded[1, 0] = False
    assert apply_keep_mask(cache, padded) == [8, 7]
