"""RemoteBackend (a real ``nexus-sidecar serve`` subprocess, memory store) decides exactly like
LocalBackend (the engine in-process) on a tiny random Llama: same evictions at every call, same
generated tokens, for a shared eviction set and for per-layer groups, every call or every k.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from nexus_client.hf.backends import LocalBackend, PolicyBackend
from nexus_client.hf.generate import GenerationResult, generate
from nexus_client.hf.remote import RemoteBackend
from nexus_sidecar.bench.procs import SidecarProc, sidecar_process

PROMPT = [int(x) for x in torch.randint(3, 128, (70,), generator=torch.Generator().manual_seed(5))]
LAYERS = 2


@pytest.fixture(scope="module")
def tiny() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=128, max_position_embeddings=512,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def sidecar() -> Iterator[SidecarProc]:
    with sidecar_process("--store", "memory", "--device", "cpu", "--max-delay-us", "0") as proc:
        yield proc


def _cfg(**kw: object) -> dict[str, object]:
    base: dict[str, object] = dict(policy="nexus", budget=24, slack=0, sinks=2, recent=4, groups=1, fanout=4, seed=7)
    base.update(kw)
    return base


def _run(model: object, backend: PolicyBackend, cfg: dict[str, object], every_k: int,
         head_reduce: str = "mean") -> GenerationResult:
    return generate(model, None, PROMPT, backend, cfg, max_new_tokens=30, every_k=every_k, chunk_size=16,
                    head_reduce=head_reduce)  # type: ignore[arg-type]


def _calls(res: GenerationResult) -> list[tuple[str, int, list[list[int]]]]:
    return [(e.phase, e.step, e.positions) for e in res.evictions]


@pytest.mark.parametrize("groups", [1, LAYERS], ids=["shared", "per-layer"])
@pytest.mark.parametrize(("every_k", "slack", "head_reduce"), [(1, 0, "mean"), (4, 3, "max")])
def test_remote_equals_local(tiny, sidecar: SidecarProc, groups: int, every_k: int, slack: int,
                             head_reduce: str) -> None:
    cfg = _cfg(groups=groups, slack=slack)
    local = _run(tiny, LocalBackend(), cfg, every_k, head_reduce)
    with RemoteBackend(sidecar.target) as remote:
        res = _run(tiny, remote, cfg, every_k, head_reduce)
        assert remote.calls == res.policy_calls == local.policy_calls
        assert remote.bytes_sent > 0 and all(r.bytes > 0 for r in remote.records)
    assert res.evictions, "a 70-token prompt under a 24-token budget must evict"
    assert sum(e.phase == "prefill" for e in res.evictions) >= 2, "chunked prefill evicts on several calls"
    assert _calls(res) == _calls(local)
    assert res.token_ids == local.token_ids
    assert res.cache_sizes_over_time == local.cache_sizes_over_time
    assert max(res.timings["cache_after_call"]) <= 24 + slack
    if groups > 1:
        assert any(e.positions[0] != e.positions[1] for e in res.evictions), "layers evict independently"


def test_remote_fp16_summaries_keep_the_budget(tiny, sidecar: SidecarProc) -> None:
    """fp16 summaries (half the float bytes) are not bit-equal by design, but the budget still holds."""
    cfg = _cfg(slack=3)
    with RemoteBackend(sidecar.target, float_dtype=torch.float32) as r32:
        _run(tiny, r32, cfg, 4)
    with RemoteBackend(sidecar.target, float_dtype=torch.float16) as r16:
        res = _run(tiny, r16, cfg, 4)
    assert res.evictions and max(res.timings["cache_after_call"]) <= 27
    assert r16.calls == r32.calls and r16.bytes_sent < r32.bytes_sent
    with pytest.raises(ValueError, match="float_dtype"):
        RemoteBackend(sidecar.target, float_dtype=torch.bfloat16)


def test_cli_sidecar_only_flags_need_sidecar() -> None:
    from nexus_sidecar.cli import main

    with pytest.raises(SystemExit, match="only apply with --sidecar"):
        main(["generate", "--prompt", "x", "--api-key", "k"])
    with pytest.raises(SystemExit, match="only apply with --sidecar"):
        main(["generate", "--prompt", "x", "--wire-dtype", "fp16"])
