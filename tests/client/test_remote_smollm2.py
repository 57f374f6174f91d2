"""End-to-end: the real SmolLM2-135M decoded under a 48-token budget by a real sidecar process.

The policy runs in a ``nexus-sidecar serve`` subprocess (memory store, loopback port); the worker
side (capture, accumulation, cache surgery) runs here. Checked: the KV cache never exceeds
budget + slack after a call, evictions happen (and every call's positions equal the in-process
engine's), and the tokens equal the in-process engine's. The worker's retained count and checksum
ride on every step, so a divergence would have failed a call with FAILED_PRECONDITION. Uses the
cached safetensors copy of the bundled GGUF (built once, ~25 s, by the first load); nothing is
downloaded.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from tests.client.conftest import PASSKEY_PROMPT, require_smollm2

require_smollm2()

from nexus_client.hf import LocalBackend, generate, load_model  # noqa: E402
from nexus_client.hf.remote import RemoteBackend  # noqa: E402
from nexus_sidecar.bench.procs import sidecar_process  # noqa: E402

PROMPT = PASSKEY_PROMPT
BUDGET, SLACK, EVERY = 48, 3, 4


@pytest.mark.slow
def test_smollm2_remote_sidecar_bounded_and_equal_to_local() -> None:
    loaded = load_model("smollm2")
    cfg = dict(policy="nexus", budget=BUDGET, slack=SLACK, sinks=4, recent=8, groups=1, seed=3)
    kw = dict(max_new_tokens=16, every_k=EVERY, chunk_size=32, stop_at_eos=False)
    local = generate(loaded.model, loaded.tokenizer, PROMPT, LocalBackend(), cfg, **kw)
    with sidecar_process("--store", "memory", "--device", "cpu", "--max-delay-us", "0") as proc, \
            RemoteBackend(proc.target, session_prefix="smollm2-e2e") as remote:
        res = generate(loaded.model, loaded.tokenizer, PROMPT, remote, cfg, **kw)
        assert remote.calls == res.policy_calls > 0
        decode_bytes = [r.bytes for r in remote.records if r.k <= EVERY]
    assert res.prompt_tokens > 2 * BUDGET
    after_call = res.timings["cache_after_call"]
    assert len(after_call) == res.policy_calls and max(after_call) <= BUDGET + SLACK
    # Between calls the cache grows by at most one prefill chunk or one call's k tokens.
    assert max(size for _, size in res.cache_sizes_over_time) <= BUDGET + SLACK + 32
    evicted = sum(e.count for e in res.evictions)
    assert res.evictions and evicted >= res.prompt_tokens + len(res.token_ids) - 1 - (BUDGET + SLACK)
    assert res.token_ids == local.token_ids and len(res.token_ids) == 16
    assert [(e.step, e.positions) for e in res.evictions] == [(e.step, e.positions) for e in local.evictions]
    assert decode_bytes and max(decode_bytes) < 4096, "a decode call carries one small summary"
