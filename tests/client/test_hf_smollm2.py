"""End-to-end: the real SmolLM2-135M (bundled GGUF, cached as safetensors) under a 48-token budget.

The first run de-quantizes the GGUF once (~25 s) into ``~/.cache/nexus-sidecar/models/smollm2``
(or ``NEXUS_MODEL_CACHE``); later runs load the copy in about a second.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.client.conftest import PASSKEY_PROMPT, require_smollm2

require_smollm2()

from nexus_client.hf import LocalBackend, generate, load_model  # noqa: E402

PROMPT = PASSKEY_PROMPT
BUDGET = 48


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


@pytest.mark.slow
def test_smollm2_bounded_cache_evicts_and_is_deterministic(smollm2) -> None:
    cfg = dict(policy="nexus", budget=BUDGET, slack=0, sinks=4, recent=8, groups=1, seed=3)
    runs = [
        generate(
            smollm2.model, smollm2.tokenizer, PROMPT, LocalBackend(), cfg, max_new_tokens=12, every_k=1, chunk_size=64
        )
        for _ in range(2)
    ]
    res = runs[0]
    assert res.prompt_tokens > 2 * BUDGET
    assert res.evictions and sum(e.count for e in res.evictions) >= res.prompt_tokens - BUDGET
    assert max(res.timings["cache_after_call"]) <= BUDGET
    assert max(size for _, size in res.cache_sizes_over_time) <= BUDGET + 64  # at most one chunk above
    assert len(res.token_ids) >= 1 and isinstance(res.text, str)
    assert runs[1].token_ids == res.token_ids
    assert [e.positions for e in runs[1].evictions] == [e.positions for e in res.evictions]


@pytest.mark.slow
def test_cli_generate_prints_text_table_and_evictions(smollm2, capsys, tmp_path) -> None:
    from nexus_sidecar.cli import main

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    rc = main(["generate", "--model", "smollm2", "--budget", str(BUDGET), "--prompt-file", str(prompt_file),
               "--max-new-tokens", "6", "--every", "2", "--slack", "1", "--seed", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "step  cache" in out and "evictions:" in out and "policy calls" in out
