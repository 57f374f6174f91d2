"""``make demo``'s two halves: the quiet install (progress lines, output in a log, a failing step
shows its tail) and the demo ending with its table and what the columns mean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The install's steps, counted from the script's own list (one "what|command" entry each).
STEPS = sum(1 for line in (ROOT / "scripts" / "install.sh").read_text().splitlines()
            if line.startswith('  "') and "|" in line)


def install(tmp_path: Path, pip: str) -> subprocess.CompletedProcess[str]:
    """scripts/install.sh --quiet with PIP replaced (the system step runs for real: idempotent)."""
    env = {**os.environ, "PIP": pip, "INSTALL_LOG": str(tmp_path / "install.log")}
    return subprocess.run([str(ROOT / "scripts" / "install.sh"), "--quiet"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_quiet_install_prints_one_line_per_step_and_logs_the_rest(tmp_path: Path) -> None:
    proc = install(tmp_path, "echo pip-ran")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"Installing (output in {tmp_path / 'install.log'}):"
    n = STEPS
    assert len(lines) == n + 1 and all(line.strip().startswith(f"[{i}/{n}]") and " ok (" in line
                                       for i, line in enumerate(lines[1:], 1)), proc.stdout
    log = (tmp_path / "install.log").read_text()
    assert "pip-ran install -q torch==2.13.0" in log and f"== [{n}/{n}]" in log  # the output went to the log
    assert "fused kernels: " in log  # the engine's C++ extension was built (or found built)


def test_quiet_install_failure_shows_the_step_and_the_log(tmp_path: Path) -> None:
    proc = install(tmp_path, "sh -c 'echo resolver exploded >&2; exit 3' --")
    assert proc.returncode == 3
    assert f"[2/{STEPS}] torch 2.13.0 (CPU wheel) ... FAILED (exit 3)" in proc.stdout
    assert "resolver exploded" in proc.stderr and f"install failed at step 2/{STEPS}" in proc.stderr
    assert str(tmp_path / "install.log") in proc.stderr


def test_demo_ends_with_its_explained_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "nexus_sidecar.cli", "demo", "--workers-per-tenant", "1",
                           "--sessions", "2", "--prefill", "160", "--steps", "24", "--budget", "64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    table = out.index("Retention by tenant")
    assert out.index("Service:") < table and out.index("Sidecar metrics:") < table  # the table comes last
    rows = [ln for ln in out[table:].splitlines() if ln.startswith("| ")]
    assert rows[0].startswith("| tenant | policy |") and len(rows) == 4
    assert {r.split("|")[2].strip() for r in rows[1:]} == {"nexus", "tova", "h2o"}
    notes = out[out.index("What the columns mean"):]
    for column in ("strong kept", "subtle kept", "bridge kept", "rpc p50/p99 ms"):
        assert column in notes
    assert "sees 184 tokens and may keep 64" in " ".join(notes.split())
