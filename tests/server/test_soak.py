"""A short soak (the 60 s one is in docs/benchmarks.md): tenants' workers with session churn against a
real serve process and a real redis-server: 0 errors, no traceback, RSS flat."""

from __future__ import annotations

import math

import pytest
from nexus_sidecar.bench.soak import SoakSettings, plot, run, table

pytestmark = pytest.mark.timeout(120)


def test_short_soak_has_no_errors_and_flat_rss(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = SoakSettings(duration_s=8.0, tenants=2, workers_per_tenant=1, sessions=3, stream=40, window_s=2.0,
                     redis=True)
    payload = run(s, progress=False)
    assert payload["errors"] == 0 and set(payload["codes"]) == {"OK"}, payload["codes"]
    assert payload["rpcs"] > 40 and payload["streams"] >= 2  # churn happened: streams closed and reopened
    assert payload["tracebacks_in_log"] == 0
    assert len(payload["windows"]) == 4 and all(w["rpcs"] > 0 for w in payload["windows"])
    assert all(not math.isnan(w["p99_ms"]) for w in payload["windows"])
    assert abs(payload["rss_growth"]) < 0.10, payload["rss_growth"]  # short run: a loose bar (60 s: < 5 %)
    assert "errors 0" in table(payload)
    plot(payload, str(tmp_path / "soak.png"))
    assert (tmp_path / "soak.png").stat().st_size > 1000
