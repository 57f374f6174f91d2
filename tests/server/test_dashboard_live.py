"""The shipped dashboards and rules checked for real (issue 23, item 3).

A real redis-server, one real ``serve`` process (Redis store, three tenants from a keys file) and a
real Prometheus with the project's rules. The fault soak's checked workers drive mixed load (Step
and StepBatch, session churn, idle pauses past ``idle_session_s`` so sessions expire and resume, a
refused request every 2 s) and Redis is SIGSTOPped for 12 s. Asserted:

- every panel query of every shipped dashboard returns at least one series, every value finite,
  while Redis is stopped and again once it is back (the tenant variable's query lists the tenants);
- every recording and alerting rule is healthy (evaluated without error);
- ``NexusStoreDegraded`` and ``NexusStoreErrors`` fire during the stall and resolve after it;
  ``NexusSidecarDown``, ``NexusStoreCASConflictsRising``, ``NexusMaintenanceErrors`` and
  ``NexusQueueDepthHigh`` never fire;
- every answer equals the in-process engine's, nothing answered INTERNAL, and the sidecar logged no
  traceback.

Time: the rules run as a test copy with every duration divided by ``SCALE`` (20): evaluation every
1.5 s instead of 30 s, ``for: 1m`` -> 3 s, ``for: 5m`` -> 15 s, ``rate(...[5m])`` -> ``[15s]``;
the expressions, thresholds, labels and annotations are the shipped ones. Prometheus scrapes every
second and the dashboards' ``$__rate_interval`` is 15 s. The whole test takes about 2 minutes.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from nexus_sidecar.bench.procs import free_port
from nexus_sidecar.bench.soak_faults import FaultSoakSettings, run

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
RULES = ROOT / "deploy/prometheus/rules.yml"
SCALE = 20
RATE_INTERVAL = "15s"
EXPECTED = {"NexusStoreDegraded", "NexusStoreErrors"}
NEVER = {"NexusSidecarDown", "NexusStoreCASConflictsRising", "NexusMaintenanceErrors", "NexusQueueDepthHigh"}
_DURATION = re.compile(r"^(\d+)([smh])$")
_RANGE = re.compile(r"\[(\d+)([smh])\]")
_ANY_RANGE = re.compile(r"\[\d+(?:ms|[smh])\]")
_UNIT = {"s": 1, "m": 60, "h": 3600}


def _scaled(d: str) -> str:
    m = _DURATION.match(d)
    assert m, f"unexpected duration {d!r}"
    return f"{int(m.group(1)) * _UNIT[m.group(2)] * 1000 // SCALE}ms"


def scaled_rules(text: str) -> str:
    """The rules with every duration (group interval, ``for``, range selectors) divided by SCALE."""
    doc = yaml.safe_load(text)
    for group in doc["groups"]:
        group["interval"] = _scaled(group.get("interval", "30s"))
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = _scaled(rule["for"])
            rule["expr"] = _RANGE.sub(lambda m: "[" + _scaled(m.group(1) + m.group(2)) + "]", rule["expr"])
    return yaml.safe_dump(doc, sort_keys=False)


def test_scaled_rules_keep_everything_but_time() -> None:
    doc, fast = yaml.safe_load(RULES.read_text()), yaml.safe_load(scaled_rules(RULES.read_text()))
    assert fast["groups"][0]["interval"] == "1500ms"
    for g0, g1 in zip(doc["groups"], fast["groups"], strict=True):
        for r0, r1 in zip(g0["rules"], g1["rules"], strict=True):
            assert {k: v for k, v in r0.items() if k not in ("for", "expr")} == \
                   {k: v for k, v in r1.items() if k not in ("for", "expr")}
            assert _ANY_RANGE.sub("[]", r0["expr"]) == _ANY_RANGE.sub("[]", r1["expr"])
    degraded = next(r for g in fast["groups"] for r in g["rules"] if r.get("alert") == "NexusStoreDegraded")
    assert degraded["for"] == "3000ms"


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) of every panel target, Grafana variables substituted."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$tenant", ".*")
                out.append((path.name, panel["title"], expr))
    return out


def _get(api: httpx.Client, path: str, **params: Any) -> Any:
    r = api.get(path, params=params)
    r.raise_for_status()
    return r.json()["data"]


def _value(api: httpx.Client, expr: str) -> float | None:
    res = _get(api, "/api/v1/query", query=expr)["result"]
    return float(res[0]["value"][1]) if res else None


def _check_panels(api: httpx.Client, when: str) -> list[str]:
    """Every panel query: at least one series, every value finite. Returns the failures."""
    bad = []
    for dash, title, expr in panel_queries():
        res = _get(api, "/api/v1/query", query=expr)["result"]
        values = [float(s["value"][1]) for s in res]
        if not values or not all(math.isfinite(v) for v in values):
            bad.append(f"{when}: {dash} / {title}: {values[:6]} <- {expr}")
    return bad


def test_dashboards_rules_and_alerts_under_load_and_a_redis_stall(prometheus_factory, tmp_path: Path) -> None:
    assert DASHBOARDS, "no dashboard shipped"
    rules = tmp_path / "rules-fast.yml"
    rules.write_text(scaled_rules(RULES.read_text()))
    ports = (free_port(), free_port())
    s = FaultSoakSettings(duration_s=110, cycle_s=110, faults=("redis_pause",), pause_s=12.0, tenants=3,
                          workers_per_tenant=1, sessions=2, stream=40, idle_every=20, idle_session_s=4.0,
                          bad_every_s=2.0, ports=[ports])
    result: dict[str, Any] = {}

    def soak() -> None:
        try:
            result["payload"] = run(s, progress=False, work_dir=tmp_path / "soak")
        except BaseException as exc:  # surfaced by the main thread
            result["error"] = exc

    (tmp_path / "soak").mkdir()
    prom = prometheus_factory(ports[1], job="nexus-sidecar", rules=rules)
    thread = threading.Thread(target=soak, daemon=True)
    thread.start()
    seen: dict[str, set[str]] = {}
    failures: list[str] = []
    checked = {"fault": False, "clear": False}
    degraded_at = cleared_at = None
    deadline = time.monotonic() + 240
    with httpx.Client(base_url=prom.url, timeout=5) as api:
        while time.monotonic() < deadline:
            assert prom.proc.poll() is None, f"prometheus exited:\n{prom.log_tail()}"
            try:
                alerts = _get(api, "/api/v1/alerts")["alerts"]
                degraded = _value(api, "max(nexus_degraded)")
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            for a in alerts:
                seen.setdefault(a["labels"]["alertname"], set()).add(a["state"])
            if degraded == 1 and degraded_at is None:
                degraded_at = time.monotonic()
            if degraded_at and not checked["fault"] and time.monotonic() - degraded_at > 4:
                failures += _check_panels(api, "Redis stopped")  # windows hold the stall and the load
                checked["fault"] = True
            if degraded_at and degraded == 0 and cleared_at is None:
                cleared_at = time.monotonic()
            if cleared_at and not checked["clear"] and time.monotonic() - cleared_at > 25:
                failures += _check_panels(api, "Redis back")  # windows hold load only
                checked["clear"] = True
            firing_now = {a["labels"]["alertname"] for a in alerts}
            if not thread.is_alive() and checked["clear"] and not (firing_now & EXPECTED):
                break
            time.sleep(0.5)
        rule_groups = _get(api, "/api/v1/rules")["groups"]
        tenants = _get(api, "/api/v1/label/tenant/values", **{"match[]": "nexus_tokens_seen_total"})
        final_alerts = {a["labels"]["alertname"] for a in _get(api, "/api/v1/alerts")["alerts"]}
    thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    payload = result["payload"]

    assert checked == {"fault": True, "clear": True}, (checked, degraded_at, cleared_at, prom.log_tail())
    assert not failures, "\n".join(failures)
    rules_seen = [r for g in rule_groups for r in g["rules"]]
    assert len(rules_seen) == sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    unhealthy = [(r["name"], r["health"], r.get("lastError")) for r in rules_seen if r["health"] != "ok"]
    assert not unhealthy, unhealthy
    for name in EXPECTED:
        assert "firing" in seen.get(name, set()), f"{name} never fired: {seen}"
        assert name not in final_alerts, f"{name} did not resolve: {final_alerts}"
    for name in NEVER:
        assert "firing" not in seen.get(name, set()), f"{name} fired: {seen}"
    assert set(tenants) >= {"tenant0", "tenant1", "tenant2"}, tenants

    assert payload["wrong_answers"] == 0 and payload["answers_compared"] > 100, payload["first_wrong"]
    assert payload["internal"] == 0 and payload["tracebacks_in_logs"] == 0
    assert payload["unexpected"] == {} and payload["bad_unexpected"] == {}, payload
    assert payload["bad_expected"] > 10  # refused requests every 2 s: INVALID_ARGUMENT, NOT_FOUND, ...
    assert payload["sessions_lost"] == 0
    (fault,) = payload["faults"]
    assert fault["degraded"] == 1 and fault["store_errors"] > 0  # what the dashboard showed of the stall
    run_view = payload["dashboard_run"]
    assert run_view["expired"] > 0 and run_view["resumed"] > 0, run_view  # idle sessions unloaded and resumed
    assert run_view["cas_other"] == 0 and run_view["maintenance_errors"] == 0 and run_view["internal"] == 0
