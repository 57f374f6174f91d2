"""Every alert in deploy/prometheus/rules.yml has a runbook in docs/operations.md."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_every_alert_has_a_runbook() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts, "no alerts found in rules.yml"
    page = (ROOT / "docs" / "operations.md").read_text()
    sections = dict(re.findall(r"^### (\w+)\n(.*?)(?=^### |^## |\Z)", page, re.S | re.M))
    missing = [a for a in alerts if a not in sections]
    assert not missing, f"alerts without a runbook section '### <alert>' in docs/operations.md: {missing}"
    for alert in alerts:
        body = sections[alert]
        for part in ("**Fires**", "**Impact.**", "**Check", "**Fix.**"):
            assert part in body, f"docs/operations.md runbook {alert} has no {part} part"
