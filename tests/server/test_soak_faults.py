"""The fault soak, short (the 10-minute run is in docs/operations-soak.md): real redis-server with
an AOF and two real ``serve`` replicas; Redis paused, killed and restarted on its AOF, replica 0
SIGKILLed and replaced, a stale replica probed. Every answer equals the in-process engine's (resyncs
mirrored), nothing answered INTERNAL, no session lost, the stale replica never answered, no
traceback in any log, and the /metrics view of each fault says what happened."""

from __future__ import annotations

import pytest
from nexus_sidecar.bench.soak_faults import FAULTS, FaultSoakSettings, run, table

pytestmark = pytest.mark.timeout(240)


def test_fault_soak_short(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = FaultSoakSettings(duration_s=75, cycle_s=75, tenants=2, workers_per_tenant=2, sessions=2, stream=30,
                          idle_every=25, idle_session_s=4.0)
    p = run(s, progress=False, work_dir=tmp_path)
    assert [f["fault"] for f in p["faults"]] == list(FAULTS)
    assert p["wrong_answers"] == 0, p["first_wrong"]
    assert p["answers_compared"] > 200 and p["answers_not_compared"] == 0 and p["resyncs_unmirrored"] == 0
    assert p["internal"] == 0 and p["tracebacks_in_logs"] == 0
    assert p["sessions_lost"] == 0
    assert p["unexpected"] == {} and p["bad_unexpected"] == {} and p["bad_expected"] > 10
    assert p["stale_answered"] == 0 and p["stale_refused"] >= 1, (p["stale_refused"], p["stale_other"])
    views = {f["fault"]: f for f in p["faults"]}
    for name in ("redis_pause", "redis_restart"):  # the dashboard saw the store go away
        assert views[name]["degraded"] == 1 and views[name]["store_errors"] > 0, views[name]
    # A replica that died: its sessions came back from Redis on the new one (resync where behind).
    assert views["replica_kill"]["resumed"] > 0
    # A stale replica is fenced: sessions dropped there, and no store error or CAS conflict counted.
    stale = views["stale_replica"]
    assert stale["sessions_fenced"] > 0 and stale["store_errors"] == 0 and stale["cas_other"] == 0, stale
    assert p["dashboard_run"]["maintenance_errors"] == 0
    text = table(p)
    assert "wrong 0" in text and "| replica_kill |" in text
