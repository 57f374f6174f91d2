"""PolicyRun: one policy call on a real cache, with the cache's priors when the policy reads them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from nexus_client.hf import LocalBackend, PolicyRun
from nexus_client.hf.capture import QueryRecorder, attention_modules, capture_queries
from nexus_client.hf.generate import generate
from nexus_client.hf.policy_run import reads_priors
from nexus_client.hf.priors import cache_priors
from nexus_client.packing import WorkerSession, pack_step

from tests.client.conftest import tiny_llama


@pytest.fixture(scope="module")
def tiny() -> Any:
    return tiny_llama()


def _prefill(model: Any, n: int) -> tuple[Any, Any]:
    from transformers import DynamicCache

    rec = QueryRecorder(len(attention_modules(model)))
    cache = DynamicCache(config=model.config)
    ids = torch.randint(3, 120, (1, n), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), capture_queries(model, rec):
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        cap = rec.take()
    return cache, cap


def test_keydiff_keeps_the_most_diverse_keys_of_the_cache(tiny: Any) -> None:
    cache, cap = _prefill(tiny, 80)
    div = cache_priors(cache, 1)["key_diversity"][0]
    pos = torch.arange(80)
    slots = [pos.clone()]
    cfg = {"policy": "keydiff", "budget": 30, "sinks": 2, "recent": 4}
    with PolicyRun(LocalBackend(), cfg) as run:
        assert run.priors
        run.add(cap, pos, slots)
        evicted = run.call(cache, slots)
    kept = set(slots[0].tolist())
    assert len(kept) == 30 and len(evicted[0]) == 50 and all(layer.keys.shape[-2] == 30 for layer in cache.layers)
    middle = [p for p in range(2, 76)]
    want = sorted(middle, key=lambda p: -float(div[p]))[:24]  # 30 - 2 sinks - 4 recent
    assert kept == {0, 1, 76, 77, 78, 79, *want}


def test_priors_are_sent_only_to_policies_that_read_them() -> None:
    assert reads_priors({"policy": "keydiff"}) and reads_priors({"policy": "knorm"})
    assert reads_priors({"policy": "nexus"}) and not reads_priors({"policy": "nexus", "prior_mix": 0.0})
    assert not reads_priors({"policy": "tova"}) and not reads_priors({"policy": "snapkv"})
    assert reads_priors({"policy": "nexus", "prior_mix": 0.0, "question_prior_mix": 0.5})


def test_a_prior_policy_without_priors_is_refused_by_name(tiny: Any) -> None:
    cache, cap = _prefill(tiny, 40)
    pos = torch.arange(40)
    slots = [pos.clone()]
    with PolicyRun(LocalBackend(), {"policy": "keydiff", "budget": 20}, priors=False) as run:
        run.add(cap, pos, slots)
        with pytest.raises(Exception, match="key_diversity"):
            run.call(cache, slots)


class _Recording(LocalBackend):
    """The in-process engine, noting the call kind of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[str] = []

    def step(self, session: Any, tensors: Any) -> Any:
        self.kinds.append(tensors.call)
        return super().step(session, tensors)


def test_the_call_kind_reaches_the_engine_and_generate_marks_prefill_and_decode(tiny: Any) -> None:
    cache, cap = _prefill(tiny, 40)
    pos = torch.arange(40)
    slots = [pos.clone()]
    backend = _Recording()
    with PolicyRun(backend, {"policy": "nexus", "budget": 20}) as run:
        run.add(cap, pos, slots)
        run.call(cache, slots, "question")
    assert backend.kinds == ["question"]

    backend = _Recording()
    res = generate(tiny, None, list(range(3, 70)), backend, {"policy": "nexus", "budget": 48, "slack": 0},
                   max_new_tokens=6, chunk_size=32)
    assert len(res.token_ids) == 6
    assert backend.kinds == ["context"] * 3 + ["decode"] * 5  # 67 prompt tokens in chunks of 32
    with pytest.raises(ValueError, match="call"):
        pack_step(WorkerSession("s", groups=1), pos[:1], torch.zeros(1, 1), torch.zeros(1, 1),
                  torch.full((1, 1, 1), -1), torch.zeros(1, 1, 1), call="prefill")
