"""llama.cpp's graph capture and KV memory on the real SmolLM2 GGUF (llama-cpp-python, built by
``make install``).

Checked against transformers running the same (de-quantised) weights on the same tokens: the
captured ``Qcur``/``Kcur`` are the post-RoPE queries and keys, ``Vcur`` the values. Tolerance:
llama.cpp multiplies the Q4_1 weights with activations quantised to 8 bits (its Q4_1 x Q8_1
kernels) where transformers computes in float32 with the de-quantised weights, and the difference
grows with depth. Measured on this 116-token prompt, relative error ``|a - b| / |b|`` per layer:
q 0.28 % in layer 0, at most 2.5 %; k 0.33 %, at most 2.1 %; v 1.2 %, at most 5.0 %. The bounds
below: layer 0 under 1 % (q, k) and 2 % (v), every layer under 8 %; a wrong tensor (llama.cpp's
pair order uncorrected, keys one token off) is off by 68-140 % (asserted too).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.client.conftest import PASSKEY_PROMPT, require_smollm2

require_smollm2()

from nexus_client.hf import load_model  # noqa: E402
from nexus_client.llamacpp import LlamaModel, resolve_gguf  # noqa: E402
from nexus_client.llamacpp.capture import to_hf_layout  # noqa: E402


@pytest.fixture(scope="module")
def hf():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def lm():
    model = LlamaModel(resolve_gguf("smollm2"), n_ctx=512, n_seq=2, n_batch=256, threads=1)
    yield model
    model.close()


def _hf_qkv(hf, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """transformers' post-RoPE q, k and v per layer (``[n, heads, d]``), read inside its attention."""
    from nexus_client.hf.capture import attention_modules
    from transformers import AttentionInterface

    got: dict[int, tuple[torch.Tensor, ...]] = {}

    def record(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        got[module.layer_idx] = (query[0].transpose(0, 1).clone(), key[0].transpose(0, 1).clone(),
                                 value[0].transpose(0, 1).clone())
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kw)

    AttentionInterface.register("nexus_test_record", record)
    model = hf.model
    prev = model.config._attn_implementation
    model.set_attn_implementation("nexus_test_record")
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([ids]))
    finally:
        model.set_attn_implementation(prev)
    n = len(attention_modules(model))
    return [got[i][0] for i in range(n)], [got[i][1] for i in range(n)], [got[i][2] for i in range(n)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_capture_is_post_rope_q_k_and_v(hf, lm: LlamaModel) -> None:
    ids = hf.tokenizer(PASSKEY_PROMPT).input_ids
    lm.clear()
    out = lm.decode(ids, list(range(len(ids))), [0] * len(ids), [len(ids) - 1])
    hq, hk, hv = _hf_qkv(hf, ids)
    shape = lm.shape
    assert len(out.q) == len(out.k) == len(out.v) == shape.n_layer == len(hq)
    assert out.q[0].shape == (len(ids), shape.n_head, shape.head_dim)
    assert out.k[0].shape == out.v[0].shape == (len(ids), shape.n_head_kv, shape.head_dim)
    q_err = [_rel(to_hf_layout(out.q[i]), hq[i]) for i in range(shape.n_layer)]
    k_err = [_rel(to_hf_layout(out.k[i]), hk[i]) for i in range(shape.n_layer)]
    v_err = [_rel(out.v[i], hv[i]) for i in range(shape.n_layer)]
    assert max(q_err[0], k_err[0]) < 0.01 and v_err[0] < 0.02, (q_err[0], k_err[0], v_err[0])
    assert max(q_err + k_err + v_err) < 0.08, (max(q_err), max(k_err), max(v_err))
    # What a wrong capture would look like: llama.cpp's own pair order, or keys one position off.
    assert _rel(out.k[5], hk[5]) > 0.5
    assert _rel(to_hf_layout(out.k[5][1:]), hk[5][:-1]) > 0.5
    # The dot products the summary uses do not depend on the layout.
    a = torch.einsum("nhd,mhd->hnm", out.k[3], out.k[3])
    b = torch.einsum("nhd,mhd->hnm", to_hf_layout(out.k[3]), to_hf_layout(out.k[3]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # The same logits' top token as transformers.
    with torch.inference_mode():
        ref = hf.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert int(out.logits[len(ids) - 1].argmax()) == int(ref.argmax())


def test_cells_and_seq_rm_on_llamacpps_cache(lm: LlamaModel) -> None:
    lm.clear()
    ids = list(range(1000, 1040))
    lm.decode(ids, list(range(40)), [0] * 40)
    assert lm.cells(0).tolist() == list(range(40)) and lm.cell_count(1) == 0
    gone = [5, 6, 7, 8, 9, 20, 33]
    assert lm.remove(0, gone) == 3  # three runs of consecutive positions: [5, 10), [20, 21), [33, 34)
    kept = [p for p in range(40) if p not in gone]
    assert sorted(lm.cells(0).tolist()) == kept
    assert lm.pos_max(0) == 39
    # Decoding goes on at explicit positions, in the freed cells too; sequence 1 is independent.
    lm.decode([7, 8, 9], [40, 41, 42], [0, 0, 0])
    lm.decode([11, 12], [0, 1], [1, 1])
    assert sorted(lm.cells(0).tolist()) == [*kept, 40, 41, 42]
    assert lm.cells(1).tolist() == [0, 1]
    with pytest.raises(RuntimeError, match="llama_decode"):
        lm.decode([5], [50], [0])  # not pos_max + 1: llama.cpp refuses a gap inside a sequence
    lm.clear(0)
    assert lm.cell_count(0) == 0 and lm.cell_count(1) == 2
