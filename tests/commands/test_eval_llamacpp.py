"""``nexus-sidecar eval --engine llamacpp --pipeline`` as a user runs it: the records say which engine,
weights and call mode ran, and the pipelined streaming run kept the context within its budget."""

from __future__ import annotations

import json
from pathlib import Path

from tests.client.conftest import require_smollm2
from tests.commands.test_cli_errors import cli, one_line_error

require_smollm2()


def test_eval_llamacpp_pipelined_records(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    proc = cli("eval", "--engine", "llamacpp", "--pipeline", "--tasks", "passkey", "--lengths", "512",
               "--samples", "1", "--policies", "nexus", "--modes", "streaming", "--eviction", "0.8",
               "--threads", "1", "--no-progress", "--json", str(out), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [rec] = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines() if line.strip()]
    assert rec["engine"] == "llamacpp" and rec["weights"] == "f16" and rec["pipeline"] is True
    assert rec["mode"] == "streaming" and rec["policy_calls"] > 2 and rec["evicted"] > 0
    assert rec["kept_context"] <= rec["budget"]  # the last answer was applied before the question


def test_eval_weights_need_llamacpp() -> None:
    proc = cli("eval", "--weights", "q8_0", "--tasks", "passkey", "--samples", "1", "--json", "/tmp/never.json")
    one_line_error(proc, "--weights", "--engine llamacpp")
