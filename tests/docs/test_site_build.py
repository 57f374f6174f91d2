"""The documentation site builds with ``mkdocs build --strict`` (offline): a broken link or anchor,
a missing page, a page left out of the nav or an unresolvable API reference fails it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_strict_build(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocstrings reads service/ and client/ statically
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        "mkdocs build --strict failed (`make docs` shows the same). A new page must be listed in mkdocs.yml's "
        "nav (its comments say where); links must point at pages under docs/ (plots as "
        f"../benchmarks/results/NAME.png).\n{log[-4000:]}")
    # The generated references, the API reference, the included deploy page and the plots are there.
    assert "max_concurrent_rpcs" in (site / "reference" / "settings.html").read_text()
    assert "NexusClient" in (site / "reference" / "api-client.html").read_text()
    assert "PolicyConfig" in (site / "reference" / "api-engine.html").read_text()
    assert "docker compose (local stack)" in (site / "deploy.html").read_text()
    assert (site / "results" / "survival.png").is_file() and (site / "img" / "nexus-sampling.png").is_file()
    assert 'src="results/survival.png"' in (site / "benchmarks.html").read_text()
