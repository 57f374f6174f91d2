"""The worker-side priors: a hand computation, kvpress's own scores, per-layer padding, and the
engine accepting what they produce."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nexus_client.hf.cache_surgery import apply_keep_mask
from nexus_client.hf.priors import PRIORS, cache_priors, layer_priors
from nexus_sidecar.engine import Engine, PolicyConfig, StepInput
from nexus_sidecar.engine.config import PRIORS as ENGINE_PRIORS
from transformers import DynamicCache

from tests.client.conftest import tiny_llama


def _cache(*layers: tuple[torch.Tensor, torch.Tensor]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache


def test_names_agree_with_the_engine_and_the_wire() -> None:
    from nexus_client.v1 import sidecar_pb2 as pb

    assert PRIORS == ENGINE_PRIORS == ("key_diversity", "key_norm", "value_norm")
    assert all(name in pb.SessionStep.DESCRIPTOR.fields_by_name for name in PRIORS)


def test_hand_computation_one_head() -> None:
    # Keys (3, 4), (0, 2), (-1, 0): unit keys (0.6, 0.8), (0, 1), (-1, 0); their mean (-0.4/3, 1.8/3).
    k = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]]).reshape(1, 1, 3, 2)
    v = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 2.0]]).reshape(1, 1, 3, 2)
    anchor = torch.tensor([-0.4, 1.8]) / 3
    a = anchor / anchor.norm()
    expect_kd = [-(0.6 * a[0] + 0.8 * a[1]), -a[1], a[0]]
    out = cache_priors(_cache((k, v)), groups=1)
    assert set(out) == set(PRIORS)
    assert torch.allclose(out["key_diversity"][0], torch.tensor(expect_kd), atol=1e-6)
    assert torch.allclose(out["key_norm"][0], torch.tensor([5.0, 2.0, 1.0]))
    assert torch.allclose(out["value_norm"][0], torch.tensor([1.0, 0.0, math.sqrt(8)]))
    assert all(t.dtype == torch.float32 and t.shape == (1, 3) for t in out.values())


def test_averages_over_heads_then_layers() -> None:
    torch.manual_seed(0)
    layers = [(torch.randn(1, 3, 7, 8), torch.randn(1, 3, 7, 8)) for _ in range(4)]
    shared = cache_priors(_cache(*layers), groups=1)
    per_layer = cache_priors(_cache(*layers), groups=4)
    for i, name in enumerate(PRIORS):
        by_head = torch.stack([torch.stack([layer_priors(k[:, h : h + 1], v[:, h : h + 1])[i] for h in range(3)])
                               for k, v in layers])  # [layers, heads, L]
        assert torch.allclose(per_layer[name], by_head.mean(1), atol=1e-6), name
        assert torch.allclose(shared[name][0], by_head.mean((0, 1)), atol=1e-6), name


_KVPRESS_SCORES = """
import sys, torch, kvpress
k, v = torch.load(sys.argv[1])
keydiff = kvpress.KeyDiffPress().score(None, None, k, v, None, {})
knorm = kvpress.KnormPress().score(None, None, k, v, None, {})
torch.save((keydiff, knorm), sys.argv[2])
"""


def test_matches_kvpress_scores(tmp_path: Path) -> None:
    # kvpress scores per head; with one kv head and one layer ours must be the same numbers. It runs
    # in a child process: importing kvpress patches transformers' attention for the whole process.
    if importlib.util.find_spec("kvpress") is None:  # find_spec: importing it here would patch
        pytest.skip("kvpress is not installed")
    torch.manual_seed(1)
    k, v = torch.randn(1, 1, 50, 16) * 3, torch.randn(1, 1, 50, 16)
    torch.save((k, v), tmp_path / "kv.pt")
    subprocess.run([sys.executable, "-c", _KVPRESS_SCORES, str(tmp_path / "kv.pt"), str(tmp_path / "scores.pt")],
                   check=True, timeout=300)
    keydiff, knorm = torch.load(tmp_path / "scores.pt")
    out = cache_priors(_cache((k, v)), groups=1)
    assert torch.allclose(out["key_diversity"][0], keydiff[0, 0], atol=1e-6)
    assert torch.allclose(out["key_norm"][0], -knorm[0, 0], atol=1e-5)


def test_per_layer_rows_are_right_padded_and_shared_needs_equal_lengths() -> None:
    torch.manual_seed(2)
    cache = _cache(*[(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)) for _ in range(2)])
    apply_keep_mask(cache, [torch.tensor([True] * 6), torch.tensor([True, False, True, False, True, True])])
    out = cache_priors(cache, groups=2)
    assert out["key_norm"].shape == (2, 6)
    assert (out["key_norm"][1, 4:] == 0).all() and (out["key_norm"][1, :4] > 0).all()
    assert torch.allclose(out["key_norm"][1, :4], layer_priors(cache.layers[1].keys, cache.layers[1].values)[1])
    with pytest.raises(ValueError, match="same slots"):
        cache_priors(cache, groups=1)
    with pytest.raises(ValueError, match="groups"):
        cache_priors(cache, groups=3)


def test_bf16_cache_zero_key_and_bounds() -> None:
    k = torch.randn(1, 2, 9, 8).to(torch.bfloat16)
    k[0, :, 3] = 0  # a zero key: cosine 0, as F.cosine_similarity
    k[0, :, 4] = k[0, :, 5]  # identical keys get identical scores
    out = cache_priors(_cache((k, k.clone())), groups=1)
    kd = out["key_diversity"][0]
    assert kd.dtype == torch.float32 and kd[3] == 0 and kd[4] == kd[5]
    assert (kd >= -1).all() and (kd <= 1).all()
    # All keys equal: every cosine is 1 up to rounding, clamped into range.
    same = torch.ones(1, 1, 5, 3) * 0.1
    kd = cache_priors(_cache((same, same)), groups=1)["key_diversity"]
    assert torch.allclose(kd, torch.full_like(kd, -1.0)) and (kd >= -1).all()


def test_a_real_model_cache_feeds_the_engine() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    eng = Engine("cpu")
    for groups in (1, 2):
        priors = cache_priors(cache, groups)
        h = eng.open(PolicyConfig(policy="keydiff", budget=12, sinks=2, recent=2, groups=groups, fanout=2))
        flat = torch.full((groups, 30), 1 / 30)
        none = (torch.full((groups, 30, 2), -1), torch.zeros(groups, 30, 2))
        out = eng.step({h: StepInput(torch.arange(30), flat, flat, *none, **priors)})[h]
        assert out.retained == [12] * groups
        kd = priors["key_diversity"][0, 2:28]
        kept_kd = kd[out.keep[0, 2:28]]
        assert kept_kd.min() >= kd[~out.keep[0, 2:28]].max()  # the most diverse keys stay
