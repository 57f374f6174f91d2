"""Attention capture, worker-side accumulation and top-F edge extraction: shapes and values."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from nexus_client.hf.accumulate import AttentionAccumulator, top_edges
from nexus_client.hf.capture import AttentionRecorder, ForwardCapture, capture_attention

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


def _cap(rows: torch.Tensor) -> ForwardCapture:
    return ForwardCapture(mass=[rows.sum(0)], last=[rows[-1]], rows=[rows])


def test_accumulator_sums_aligned_slots_across_growing_cache() -> None:
    acc = AttentionAccumulator(groups=1, fanout=2)
    # Step 1: cache holds positions [0, 1, 5] + new 6 -> 4 slots.
    r1 = torch.tensor([[0.4, 0.1, 0.2, 0.3]])
    acc.add(_cap(r1), torch.tensor([6]), [torch.tensor([0, 1, 5, 6])])
    # Step 2: one more token appended (position 7) -> 5 slots.
    r2 = torch.tensor([[0.1, 0.15, 0.05, 0.5, 0.2]])
    acc.add(_cap(r2), torch.tensor([7]), [torch.tensor([0, 1, 5, 6, 7])])
    assert acc.pending == 2
    st = acc.build()
    assert st.new_positions.tolist() == [6, 7]
    assert st.attn.shape == st.last.shape == (1, 5)
    assert torch.allclose(st.attn[0], torch.tensor([0.5, 0.25, 0.25, 0.8, 0.2]))
    assert torch.allclose(st.last[0], r2[0])
    assert st.edge_pos.shape == st.edge_w.shape == (1, 2, 2)
    assert st.edge_pos[0].tolist() == [[0, 5], [6, 1]]  # self (6 resp. 7) excluded
    acc.reset()
    assert acc.pending == 0
    with pytest.raises(RuntimeError, match="no new tokens"):
        acc.build()


def test_accumulator_per_layer_groups_pad_right() -> None:
    acc = AttentionAccumulator(groups=2, fanout=1)
    cap = ForwardCapture(
        mass=[torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.3, 0.5])],
        last=[torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.3, 0.5])],
        rows=[torch.tensor([[0.5, 0.5]]), torch.tensor([[0.2, 0.3, 0.5]])],
    )
    acc.add(cap, torch.tensor([9]), [torch.tensor([2, 9]), torch.tensor([0, 2, 9])])
    st = acc.build()
    assert st.attn.shape == (2, 3) and st.attn[0, 2] == 0.0
    assert st.edge_pos.tolist() == [[[2]], [[2]]]


def test_accumulator_rejects_misaligned_input() -> None:
    acc = AttentionAccumulator(groups=1, fanout=2)
    with pytest.raises(ValueError, match="last 1 slots are not the new positions"):
        acc.add(_cap(torch.tensor([[0.5, 0.5]])), torch.tensor([4]), [torch.tensor([0, 3])])
    acc.add(_cap(torch.tensor([[0.2, 0.3, 0.5]])), torch.tensor([4]), [torch.tensor([0, 3, 4])])
    with pytest.raises(ValueError, match="cache shrank"):
        acc.add(_cap(torch.tensor([[0.5, 0.5]])), torch.tensor([5]), [torch.tensor([0, 5])])


def test_recorder_head_reduction_and_observation_window() -> None:
    probs = torch.tensor(
        [[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.6]], [[1.0, 0.0, 0.0], [0.1, 0.9, 0.0], [0.6, 0.2, 0.2]]]]
    )  # [B=1, H=2, q=3, L=3]
    for reduce, expect in (("mean", probs[0].mean(0)), ("max", probs[0].amax(0))):
        rec = AttentionRecorder(num_layers=2, groups=1, head_reduce=reduce, obs_window=2)
        rec.start()
        rec.record(0, probs)
        rec.record(1, probs)
        cap = rec.finish()
        assert torch.allclose(cap.rows[0], expect)  # averaged over the two (identical) layers
        assert torch.allclose(cap.mass[0], expect[1:].sum(0))  # only the last 2 queries
        assert torch.allclose(cap.last[0], expect[-1])
    with pytest.raises(ValueError, match="groups must be 1"):
        AttentionRecorder(num_layers=3, groups=2)
    rec = AttentionRecorder(num_layers=2)
    rec.start()
    rec.record(0, probs)
    with pytest.raises(RuntimeError, match="captured 1 layers, expected 2"):
        rec.finish()


@torch.inference_mode()
def test_capture_matches_eager_output_attentions() -> None:
    """The capturing attention gives the same logits as sdpa and the same probabilities as eager."""
    model = tiny_llama(2048)
    ids = torch.randint(0, 128, (1, 12))
    pos = torch.arange(12)[None]
    model.set_attn_implementation("eager")
    ref = model(input_ids=ids, position_ids=pos, output_attentions=True)
    model.set_attn_implementation("sdpa")
    for reduce, per_layer in (("mean", False), ("max", True)):
        rec = AttentionRecorder(2, groups=2 if per_layer else 1, head_reduce=reduce)
        with capture_attention(model, rec):
            rec.start()
            out = model(input_ids=ids, position_ids=pos)
            cap = rec.finish()
        assert model.config._attn_implementation == "sdpa"  # restored
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
        per = [a[0].mean(0) if reduce == "mean" else a[0].amax(0) for a in ref.attentions]
        expect = per if per_layer else [sum(per) / 2]
        for got_rows, exp_rows in zip(cap.rows, expect, strict=True):
            torch.testing.assert_close(got_rows, exp_rows, atol=1e-6, rtol=1e-5)
        assert cap.mass[0].shape == (12,)


@torch.inference_mode()
def test_capture_survives_kvpress_wrapping_the_registered_kernels() -> None:
    """kvpress wraps every registered attention kernel at import and passes ``dropout`` positionally;
    our kernel registered before that import must still give the model's own logits (it raised
    "multiple values for argument 'scaling'" when ``scaling`` came first)."""
    from kvpress.attention_patch import attention_patch
    from nexus_client.hf.capture import nexus_attention_forward
    from transformers import AttentionInterface

    model = tiny_llama(2048)
    ids = torch.randint(0, 128, (1, 12))
    model.set_attn_implementation("eager")
    ref = model(input_ids=ids).logits
    rec = AttentionRecorder(2)
    with capture_attention(model, rec):
        AttentionInterface.register("nexus_capture", attention_patch(nexus_attention_forward))
        try:
            rec.start()
            out = model(input_ids=ids).logits
            rec.finish()
        finally:
            AttentionInterface.register("nexus_capture", nexus_attention_forward)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
