"""kvpress's own presses on the shared prefill equal kvpress's forward hook inside a prefill."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from nexus_client.hf.capture import QueryRecorder, attention_modules, capture_queries
from nexus_sidecar.evals.driver import apply_press, prefill
from nexus_sidecar.evals.kvpress_baselines import PRESSES, check_press_knobs, make_press


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_press_on_captured_layer_inputs_equals_the_press_inside_the_prefill(tiny: Any, name: str) -> None:
    from transformers import DynamicCache

    model, _ = tiny
    ids = torch.randint(3, 500, (96,), generator=torch.Generator().manual_seed(7))
    prefix = prefill(model, ids.tolist())
    ours = copy.deepcopy(prefix.cache)
    apply_press(make_press(f"kvpress:{name}", 0.75, {}, seed=3), model, ours, prefix.inputs)

    theirs = DynamicCache(config=model.config)
    # The same attention kernel as the prefill above (recording off), so the layer inputs are identical.
    with torch.inference_mode(), capture_queries(model, QueryRecorder(len(attention_modules(model)))), \
            make_press(f"kvpress:{name}", 0.75, {}, seed=3)(model):  # fmt: skip
        model.model(input_ids=ids[None], past_key_values=theirs)
    for i, (a, b) in enumerate(zip(ours.layers, theirs.layers, strict=True)):
        assert a.keys.shape[-2] == b.keys.shape[-2] == 24, (name, i)  # 96 x (1 - 0.75)
        torch.testing.assert_close(a.keys, b.keys, msg=f"{name} layer {i} keys")
        torch.testing.assert_close(a.values, b.values, msg=f"{name} layer {i} values")
    full = prefix.cache.layers[0].keys
    assert not torch.equal(ours.layers[0].keys, full[..., :24, :]) or name == "streaming_llm"


def test_press_knobs_are_checked_against_the_press_fields() -> None:
    check_press_knobs("kvpress:snapkv", {"window_size": 16}, "x")
    with pytest.raises(ValueError, match="window"):
        check_press_knobs("kvpress:snapkv", {"window": 16}, "policy 'kvpress:snapkv:window=16'")
    with pytest.raises(ValueError, match="known: "):
        make_press("kvpress:kvzip_plus", 0.5, {}, 0)
    assert make_press("kvpress:random", 0.5, {}, 11).seed == 11


@pytest.mark.parametrize("name", ["keydiff", "snapkv", "streaming_llm"])
def test_shared_selection_keeps_one_position_set_for_every_layer_and_head(tiny: Any, name: str) -> None:
    model, _ = tiny
    ids = torch.randint(3, 500, (96,), generator=torch.Generator().manual_seed(7))
    prefix = prefill(model, ids.tolist())
    shared = copy.deepcopy(prefix.cache)
    kept = apply_press(make_press(f"kvpress:{name}", 0.75, {"select": "shared"}, seed=3), model, shared, prefix.inputs)
    assert kept is not None and len(kept) == 24 and kept == sorted(set(kept))
    for full, cut in zip(prefix.cache.layers, shared.layers, strict=True):
        assert torch.equal(cut.keys, full.keys[:, :, kept]) and torch.equal(cut.values, full.values[:, :, kept])
    per_head = copy.deepcopy(prefix.cache)
    assert apply_press(make_press(f"kvpress:{name}", 0.75, {}, seed=3), model, per_head, prefix.inputs) is None
    if name == "streaming_llm":  # the same score in every head and layer: both granularities agree
        assert kept == [*range(4), *range(76, 96)]
        a, b = per_head.layers[-1].keys[0], shared.layers[-1].keys[0]  # kvpress keeps topk order, we sort
        for h in range(a.shape[0]):
            assert torch.equal(a[h][a[h, :, 0].argsort()], b[h][b[h, :, 0].argsort()])
    else:  # kvpress's heads disagree on this input, so the shared set is not any one head's
        heads = per_head.layers[0].keys
        assert not all(torch.equal(heads[:, h], shared.layers[0].keys[:, h]) for h in range(heads.shape[1]))


def test_select_knob_is_checked() -> None:
    check_press_knobs("kvpress:keydiff", {"select": "shared"}, "x")
    check_press_knobs("kvpress:keydiff", {"select": "per_head"}, "x")
    with pytest.raises(ValueError, match="select must be one of per_head, shared, got 'layer'"):
        check_press_knobs("kvpress:keydiff", {"select": "layer"}, "policy 'kvpress:keydiff:select=layer'")
    assert not hasattr(make_press("kvpress:keydiff", 0.5, {"select": "per_head"}, 0), "press")
    assert make_press("kvpress:keydiff", 0.5, {"select": "shared"}, 0).press.compression_ratio == 0.5
