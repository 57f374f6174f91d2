"""scripts/gpu_check.sh: what it runs on a CUDA machine exists, and without a device it says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_the_cuda_marker_selects_the_parity_tests() -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                           "no:cacheprovider", "tests/engine"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert collected and all("cuda" in line for line in collected), proc.stdout


def test_without_a_device_it_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # No visible device even on a CUDA machine.
    env = {**os.environ, "OUT": str(out), "PY": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert not any(out.iterdir())


def test_the_service_benchmark_runs_on_the_device_it_is_given() -> None:
    # gpu_check.sh runs the service benchmark on CUDA; asked for a device torch cannot see, the
    # benchmark refuses at once (a usage error naming the flag), before starting any process.
    assert "bench service --quick --device cuda" in SCRIPT.read_text()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{ROOT}/service:{ROOT}/client"}
    proc = subprocess.run([sys.executable, "-m", "nexus_sidecar.cli", "bench", "service", "--quick", "--device",
                           "cuda", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--device cuda: torch sees no CUDA device" in proc.stderr, proc.stderr[-2000:]
