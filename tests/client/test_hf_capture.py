"""Query capture (the model's own sdpa, queries recorded) and top-F edge extraction."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from nexus_client.hf.capture import ATTN_IMPL, QueryRecorder, capture_queries, nexus_sdpa_forward
from nexus_client.packing import top_edges

from tests.client.conftest import tiny_llama


def test_top_edges_positions_weights_padding_and_self_exclusion() -> None:
    slot_positions = torch.tensor([0, 3, 7, 9, 10])  # absolute positions of 5 slots; last 2 are new
    rows = torch.tensor(
        [
            [0.15, 0.5, 0.05, 0.3, 0.0],  # query at slot 3 (position 9); 0.3 is itself
            [0.0, 0.0, 0.2, 0.1, 0.7],  # query at slot 4 (position 10): 0.7 is itself
        ]
    )
    pos, w = top_edges(rows, slot_positions, fanout=3)
    assert pos.dtype == torch.int64 and w.dtype == torch.float32
    assert pos.tolist() == [[3, 0, 7], [7, 9, -1]]
    assert torch.allclose(w, torch.tensor([[0.5, 0.15, 0.05], [0.2, 0.1, 0.0]]))
    # Fanout above the slot count pads with -1 / 0.
    pos, w = top_edges(rows, slot_positions, fanout=8, exclude_self=False)
    assert pos.shape == (2, 8) and pos[1, 0] == 10 and (pos[:, 5:] == -1).all() and (w[:, 5:] == 0).all()
    with pytest.raises(ValueError, match="slot_positions has shape"):
        top_edges(rows, slot_positions[:4], fanout=2)


@torch.inference_mode()
def test_capture_gives_the_models_logits_and_records_post_rope_queries() -> None:
    """The recording kernel gives eager's logits (prefill, then a chunk and a decode step on a cache)
    and keeps every layer's queries, concatenated across forward passes."""
    from transformers import DynamicCache

    model = tiny_llama(2048)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    model.set_attn_implementation("eager")
    ref = model(input_ids=ids, position_ids=torch.arange(20)[None]).logits
    model.set_attn_implementation("sdpa")
    rec = QueryRecorder(2)
    cache = DynamicCache(config=model.config)
    with capture_queries(model, rec):
        assert model.config._attn_implementation == ATTN_IMPL
        parts = [model(input_ids=ids[:, a:b], position_ids=torch.arange(a, b)[None], past_key_values=cache).logits
                 for a, b in ((0, 12), (12, 19), (19, 20))]
        fq = rec.take()
    assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=1e-5, rtol=1e-5)
    assert [tuple(q.shape) for q in fq.queries] == [(4, 20, 16)] * 2 and fq.scaling == 16**-0.5
    # Post-RoPE: the recorded query of token t equals q_proj(h_t) rotated at position t.
    attn0 = model.model.layers[0].self_attn
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    cos, sin = model.model.rotary_emb(h, torch.arange(20)[None])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = attn0.q_proj(h).view(1, 20, 4, 16).transpose(1, 2)
    q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(fq.queries[0], q_rot[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="no queries recorded"):
        rec.take()


@torch.inference_mode()
def test_capture_survives_kvpress_wrapping_the_registered_kernels() -> None:
    """kvpress wraps every registered attention kernel at import and passes ``dropout`` positionally;
    our kernel registered before that import must still give the model's own logits."""
    from kvpress.attention_patch import attention_patch
    from transformers import AttentionInterface

    model = tiny_llama(2048)
    ids = torch.randint(0, 128, (1, 12))
    model.set_attn_implementation("eager")
    ref = model(input_ids=ids).logits
    rec = QueryRecorder(2)
    with capture_queries(model, rec):
        AttentionInterface.register(ATTN_IMPL, attention_patch(nexus_sdpa_forward))
        try:
            out = model(input_ids=ids).logits
            assert rec.take().tokens == 12
        finally:
            AttentionInterface.register(ATTN_IMPL, nexus_sdpa_forward)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
