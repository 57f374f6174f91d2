"""Offline validation of deploy/ and docker-compose.yml.

Real validators, no network and no cluster: yamllint, ``docker-compose config``, ``promtool``
(check config / check rules / unit tests of the alerts), ``kubectl kustomize`` (or a small Python
renderer of the same kustomizations when kubectl is absent) and ``kubernetes-validate --strict``
against Kubernetes 1.32. The dashboard's and the rules' PromQL may only name metrics that
``nexus_sidecar.server.metrics.Metrics`` registers. A missing tool FAILS with the install hint:
a skipped check would let CI pass without validating anything.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from nexus_sidecar.server.metrics import Metrics
from nexus_sidecar.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "nexus-sidecar"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "nexus-retention.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
K8S_VERSION = "1.32.0"
KUSTOMIZATIONS = ("base", "overlays/prometheus-operator", "overlays/gpu")
HINT = "run scripts/install_system_deps.sh (apt: prometheus docker-compose) and pip install -e '.[dev]'"


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: {HINT}", pytrace=False)
    return path


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


# --------------------------------------------------------------------------------------- YAML

def test_yamllint_all_yaml() -> None:
    try:
        import yamllint  # noqa: F401
    except ImportError:
        pytest.fail(f"yamllint not installed: {HINT}", pytrace=False)
    files = [str(p.relative_to(ROOT)) for p in sorted(DEPLOY.rglob("*.y*ml")) if "templates" not in p.parts]
    assert len(files) >= 15
    _run(sys.executable, "-m", "yamllint", "--strict", "-c", ".yamllint", "docker-compose.yml", ".yamllint", *files)


def _dockerignore_rules(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_root_dockerignore_matches_the_per_dockerfile_ones() -> None:
    """The classic builder reads only <context>/.dockerignore: it must be the same allowlist as
    BuildKit's deploy/<Dockerfile>.dockerignore, and let in exactly what the Dockerfiles COPY."""
    root = _dockerignore_rules(ROOT / ".dockerignore")
    assert root[0] == "**", "deny everything first, then allow"
    for name in ("Dockerfile", "Dockerfile.cuda"):
        assert _dockerignore_rules(DEPLOY / f"{name}.dockerignore") == root, name
        copied = {src for ln in (DEPLOY / name).read_text().splitlines() if ln.startswith("COPY ") and
                  "--from" not in ln for src in ln.split()[1:-1]}
        allowed = {r[1:].removesuffix("/**") for r in root if r.startswith("!")}
        assert copied == allowed, f"{name} copies {sorted(copied)}, .dockerignore allows {sorted(allowed)}"
    for never in (".venv", ".git", "tests", "benchmarks", ".cache"):
        assert f"!{never}" not in " ".join(root)


# -------------------------------------------------------------------------------- compose

@cache
def _compose() -> dict[str, Any]:
    exe = _require("docker-compose")
    _run(exe, "-f", "docker-compose.yml", "config", "-q")
    return yaml.safe_load(_run(exe, "-f", "docker-compose.yml", "config").stdout)


def _bind_mount(v: str | dict[str, Any]) -> tuple[str, Path]:
    """(target, source) of a compose volume in long or short ("src:dst[:ro]") syntax."""
    if isinstance(v, dict):
        return v["target"], Path(v["source"])
    src, dst = v.split(":")[:2]
    return dst, Path(src)


def test_compose_config_is_valid_and_wires_the_stack() -> None:
    cfg = _compose()
    services = cfg["services"]
    assert set(services) >= {"sidecar", "redis", "prometheus", "grafana"}
    side = services["sidecar"]
    assert side["environment"]["NEXUS_STORE"] == "redis://redis:6379/0"
    assert side["build"]["dockerfile"] == "deploy/Dockerfile"
    assert {"50051:50051", "8080:8080"} <= {f"{p['published']}:{p['target']}" if isinstance(p, dict) else p
                                           for p in side["ports"]}
    mounts = dict(_bind_mount(v) for s in ("prometheus", "grafana") for v in services[s]["volumes"])
    assert mounts["/etc/prometheus"] == DEPLOY / "prometheus"
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    assert mounts["/var/lib/grafana/dashboards"] == DEPLOY / "grafana" / "dashboards"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/nexus.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] if job["job_name"] == "nexus-sidecar"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"sidecar:{ServerSettings.model_fields['http_port'].default}"]


@pytest.mark.parametrize(("name", "base"), [("Dockerfile", "python:3.11-slim"),
                                           ("Dockerfile.cuda", "nvidia/cuda:")])
def test_dockerfiles_parse_and_follow_the_contract(name: str, base: str) -> None:
    """Parsed with BuildKit's own parser (PyPI ``dockerfile``); the images are not built here."""
    try:
        import dockerfile
    except ImportError:
        pytest.fail(f"dockerfile (parser) not installed: {HINT}", pytrace=False)
    cmds = dockerfile.parse_file(str(DEPLOY / name))
    args = dict(c.value[0].split("=", 1) for c in cmds if c.cmd == "ARG" and "=" in c.value[0])
    froms = [c for c in cmds if c.cmd == "FROM"]
    assert len(froms) == 2 and all(args[f.value[0].strip("${}")].startswith(base) for f in froms)
    final = cmds[cmds.index(froms[-1]):]
    by_cmd: dict[str, list[Any]] = {}
    for c in final:
        by_cmd.setdefault(c.cmd, []).append(c)
    assert by_cmd["USER"][-1].value[0].split(":")[0] not in ("0", "root"), "must run as non-root"
    assert by_cmd["EXPOSE"][0].value == ("50051", "8080")
    (hc,) = by_cmd["HEALTHCHECK"]
    assert "/healthz" in " ".join(hc.value) and "NEXUS_HTTP_PORT" in " ".join(hc.value)
    assert by_cmd["ENTRYPOINT"][0].value == ("nexus-sidecar", "serve")
    runs = [" ".join(c.value) for c in cmds if c.cmd == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
    assert "download.pytorch.org/whl/" in runs[torch]
    assert torch < runs.index("pip install ."), "torch (pinned, from the PyTorch index) before the project"
    assert args["TORCH_VERSION"] == "2.13.0"
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    for c in cmds:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                assert (ROOT / src).exists() or src == "README.md", f"{name}: COPY {src} is missing"
                assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{name}: {src} excluded by .dockerignore"


# ----------------------------------------------------------------------------- Prometheus

def test_promtool_config_rules_and_alert_unit_tests() -> None:
    exe = _require("promtool")
    _run(exe, "check", "config", "deploy/prometheus/prometheus.yml")
    _run(exe, "check", "rules", str(RULES.relative_to(ROOT)))
    _run(exe, "test", "rules", "deploy/prometheus/tests/rules_test.yml")
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert alerts >= {"NexusSidecarDown", "NexusStepLatencyP99High", "NexusStoreDegraded",
                      "NexusStoreCASConflictsRising", "NexusQueueDepthHigh"}
    readme = (DEPLOY / "README.md").read_text()
    assert all(a in readme for a in alerts), "every alert is explained in deploy/README.md"


# --------------------------------------------------------------------------------- PromQL

_FUNCS = {"rate", "irate", "increase", "sum", "avg", "max", "min", "count", "histogram_quantile", "absent",
          "clamp_min", "clamp_max", "topk", "bottomk", "label_values", "avg_over_time", "max_over_time",
          "delta", "deriv", "quantile", "vector", "scalar", "abs", "time", "sort", "sort_desc", "stddev"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def registry_series_names() -> set[str]:
    """Every series name the sidecar can expose, suffixes included (from a live Metrics registry)."""
    names: set[str] = set()
    for fam in Metrics().registry.collect():
        if fam.type == "counter":
            names |= {f"{fam.name}_total", f"{fam.name}_created"}
        elif fam.type == "histogram":
            names |= {f"{fam.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(fam.name)
    return names


def recording_rule_names() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions, keywords, labels stripped)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)           # string literals
    s = re.sub(r"label_values\(\s*([^,()]*?)\s*,\s*\w+\s*\)", r"\1", s)  # grafana label_values(m, label)
    s = re.sub(r"\{[^{}]*\}", "", s)                         # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                         # range / subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)                       # grafana variables ($__rate_interval, $tenant)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\()?", s):
        word, call = m.group(1), m.group(2)
        if word.lower() in _KEYWORDS:  # "a and (b > 0)": an operator before a parenthesis, not a call
            continue
        if call:
            assert word in _FUNCS, f"unknown PromQL function {word!r} in {expr!r}"
        else:
            names.add(word)
    return names


def test_promql_parser_finds_metrics() -> None:
    got = promql_metric_names('histogram_quantile(0.99, sum by (le, rpc) (rate(x_bucket{rpc="Step",a=~"$t"}[5m])))'
                              " / on (rpc) group_left y_total + max without (le) (up) or vector(0)"
                              " and on (rpc) (sum by (rpc) (rate(z_count[5m])) > 0)")
    assert got == {"x_bucket", "y_total", "up", "z_count"}


def _dashboard_exprs(node: Any) -> list[str]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and (k == "expr" or (k in ("query", "definition") and "(" in v)):
                out.append(v)
            else:
                out += _dashboard_exprs(v)
    elif isinstance(node, list):
        for v in node:
            out += _dashboard_exprs(v)
    return out


def test_dashboard_references_only_real_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    known = registry_series_names() | recording_rule_names()
    exprs = _dashboard_exprs(dash)
    assert len(exprs) >= 25
    used: set[str] = set()
    for e in exprs:
        names = promql_metric_names(e)
        assert names, f"no metric in {e!r}"
        assert names <= known, f"unknown metrics {sorted(names - known)} in {e!r}"
        used |= names
    # the panels the brief asks for
    for metric in ("nexus_tokens_seen_total", "nexus_tokens_evicted_total", "nexus_tokens_retained",
                   "nexus_step_retention_ratio_sum", "nexus_retained_attention_mass_sum",
                   "nexus_evicted_token_age_calls_bucket", "nexus_request_duration_seconds_bucket",
                   "nexus_engine_compute_seconds_bucket", "nexus_queue_wait_seconds_bucket",
                   "nexus_batch_sessions_bucket", "nexus_sessions_open", "nexus_sessions_resumed_total",
                   "nexus_sessions_expired_total", "nexus_store_operation_seconds_bucket", "nexus_store_errors_total",
                   "nexus_store_cas_conflicts_total", "nexus_degraded"):
        assert metric in used, f"dashboard has no panel on {metric}"
    assert any("histogram_quantile(0.99" in e and "nexus_request_duration_seconds_bucket" in e for e in exprs)
    assert any(p.get("type") == "heatmap" for p in dash["panels"])
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert "tenant" in variables and variables["tenant"]["includeAll"]
    assert sum('tenant=~"$tenant"' in e for e in exprs) >= 10
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert variables["datasource"]["current"]["value"] == ds["uid"]


def tenant_series_names() -> set[str]:
    """Series (suffixes included) of the metrics that carry a ``tenant`` label."""
    reg = Metrics().registry
    return {n for col, names in reg._collector_to_names.items() if "tenant" in getattr(col, "_labelnames", ())
            for n in names}


def test_every_panel_on_a_tenant_metric_honours_the_tenant_variable() -> None:
    """A panel that could filter by tenant does: every reference to a tenant-labelled series carries
    tenant=~"$tenant" (panels on service-wide metrics have no tenant to filter by)."""
    dash = json.loads(DASHBOARD.read_text())
    tenant_series = tenant_series_names()
    assert "nexus_evicted_token_age_calls_bucket" in tenant_series
    checked = 0
    for expr in _dashboard_exprs(dash):
        if expr.startswith("label_values("):  # the $tenant variable's own query
            continue
        for m in re.finditer(r"\b(nexus_\w+)(\{[^}]*\})?", expr):
            if m.group(1) in tenant_series:
                checked += 1
                assert m.group(2) and 'tenant=~"$tenant"' in m.group(2), f"{m.group(1)} unfiltered in {expr!r}"
    assert checked >= 20


def test_rules_reference_only_real_metrics() -> None:
    known = registry_series_names() | recording_rule_names() | {"up"}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            names = promql_metric_names(rule["expr"])
            assert names <= known, f"unknown metrics {sorted(names - known)} in {rule}"


# ------------------------------------------------------------------------------ Kubernetes

def _load_kust(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def _json_pointer_add(doc: Any, path: str, value: Any) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    doc[parts[-1]] = value


def python_kustomize(path: Path) -> list[dict[str, Any]]:
    """Render the subset of kustomize these kustomizations use (no name hash suffixes).

    The fallback when kubectl is absent; test_python_renderer_matches_kubectl keeps it honest.
    """
    k = _load_kust(path)
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        target = (path / res).resolve()
        docs += python_kustomize(target) if target.is_dir() else list(yaml.safe_load_all(target.read_text()))
    for gen in k.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env in gen.get("envs", []):
            for line in (path / env).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, val = line.partition("=")
                    data[key] = val
        for lit in gen.get("literals", []):
            key, _, val = lit.partition("=")
            data[key] = val
        existing = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == gen["name"]]
        if gen.get("behavior") == "merge":
            existing[0]["data"].update(data)
        else:
            docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for gen in k.get("secretGenerator", []):
        data = {}
        for f in gen.get("files", []):
            key, _, src = f.partition("=")
            data[key] = (path / src).read_text()
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": gen.get("type", "Opaque"),
                     "metadata": {"name": gen["name"]}, "stringData": data})
    for comp in k.get("components", []):
        docs = _apply_component((path / comp).resolve(), docs)
    for lab in k.get("labels", []):
        assert not lab.get("includeSelectors"), "renderer does not rewrite selectors"
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(lab["pairs"])
            if lab.get("includeTemplates") and "template" in d.get("spec", {}):
                d["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(lab["pairs"])
    return docs


def _apply_component(path: Path, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    k = _load_kust(path)
    assert k["kind"] == "Component"
    sub = dict(k, kind="Kustomization", components=[], patches=[], images=[])
    docs = copy.deepcopy(docs)
    rendered = python_kustomize_from(path, sub, docs)
    for patch in k.get("patches", []):
        t = patch["target"]
        for d in rendered:
            if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]:
                for op in yaml.safe_load(patch["patch"]):
                    assert op["op"] == "add", op
                    _json_pointer_add(d, op["path"], op["value"])
    for img in k.get("images", []):
        for d in rendered:
            for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img['name']}:{img['newTag']}"
    return rendered


def python_kustomize_from(path: Path, k: dict[str, Any], docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Apply a component's resources and generators on top of already rendered docs."""
    tmp_docs = list(docs)
    for res in k.get("resources", []):
        tmp_docs += list(yaml.safe_load_all((path / res).read_text()))
    for gen in k.get("configMapGenerator", []):
        data = dict(lit.partition("=")[::2] for lit in gen.get("literals", []))
        cms = [d for d in tmp_docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == gen["name"]]
        assert gen.get("behavior") == "merge" and cms, gen
        cms[0]["data"].update(data)
    return tmp_docs


def _strip_hash(name: str) -> str:
    return re.sub(r"-[a-z0-9]{10}$", "", name)


@cache
def render(kust: str) -> tuple[dict[str, Any], ...]:
    """Rendered manifests of deploy/k8s/<kust>: kubectl kustomize when present, else the Python renderer."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = _run(kubectl, "kustomize", str(K8S / kust)).stdout
        return tuple(d for d in yaml.safe_load_all(out) if d)
    return tuple(python_kustomize(K8S / kust))


def _normalise(docs: Any) -> list[Any]:
    out = []
    for d in copy.deepcopy(list(docs)):
        d["metadata"]["name"] = _strip_hash(d["metadata"]["name"])
        if d["kind"] == "Secret":
            d.pop("data", None)
            d.pop("stringData", None)
        for v in d.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "secret" in v:
                v["secret"]["secretName"] = _strip_hash(v["secret"]["secretName"])
        for c in d.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for ef in c.get("envFrom", []):
                ef["configMapRef"]["name"] = _strip_hash(ef["configMapRef"]["name"])
        out.append(d)
    return sorted(out, key=lambda d: (d["kind"], d["metadata"]["name"]))


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_python_renderer_matches_kubectl(kust: str) -> None:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl absent: the Python renderer is what render() uses (nothing to compare against)")
    assert _normalise(python_kustomize(K8S / kust)) == _normalise(render(kust))


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_rendered_manifests_validate_against_k8s_schema(kust: str) -> None:
    """kubernetes-validate --strict against 1.32 for every built-in kind.

    ServiceMonitor is a CRD whose schema kubernetes-validate does not ship: it is checked
    structurally below instead (test_servicemonitor_selects_the_service).
    """
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate not installed: {HINT}", pytrace=False)
    kinds = []
    for doc in render(kust):
        kinds.append(doc["kind"])
        if doc["kind"] == "ServiceMonitor":
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy",
            "ConfigMap", "Secret", "ServiceAccount"} <= set(kinds)


def test_strict_validation_rejects_unknown_fields() -> None:
    import kubernetes_validate

    dep = copy.deepcopy(next(d for d in render("base") if d["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def _headless(doc: dict[str, Any]) -> bool:
    return doc["kind"] == "Service" and doc["spec"].get("clusterIP") == "None"


def _by_kind(docs: Any) -> dict[str, dict[str, Any]]:
    """One doc per kind; "Service" is the ClusterIP one (the headless twin is looked up on its own)."""
    out: dict[str, dict[str, Any]] = {}
    for d in docs:
        if not _headless(d):
            out.setdefault(d["kind"], d)
    return out


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_headless_service_lists_ready_replicas_for_the_router(kust: str) -> None:
    """The router's DnsEndpoints needs one A record per ready pod on the gRPC port."""
    docs = render(kust)
    (headless,) = [d for d in docs if _headless(d)]
    svc, dep = _by_kind(docs)["Service"], _by_kind(docs)["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"] == svc["spec"]["selector"] and headless["spec"]["selector"].items() <= \
        labels.items()
    assert headless["spec"]["publishNotReadyAddresses"] is False
    (port,) = headless["spec"]["ports"]
    container_ports = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert port["name"] == "grpc" and port["targetPort"] in container_ports
    assert headless["metadata"]["name"] == svc["metadata"]["name"] + "-headless"
    tpl = (CHART / "templates" / "service-headless.yaml").read_text()
    (doc,) = [d for d in yaml.safe_load_all(strip_helm(tpl)) if d]
    assert doc["spec"]["clusterIP"] == "None" and doc["spec"]["publishNotReadyAddresses"] is False
    assert doc["spec"]["ports"][0]["targetPort"] == "grpc"
    assert yaml.safe_load((CHART / "values.yaml").read_text())["headlessService"]["enabled"] is True


def test_servicemonitor_selects_the_service() -> None:
    docs = _by_kind(render("overlays/prometheus-operator"))
    sm, svc = docs["ServiceMonitor"], docs["Service"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                           "metricRelabelings"}


def test_deployment_contract() -> None:
    docs = _by_kind(render("base"))
    dep, svc, cm, np_ = docs["Deployment"], docs["Service"], docs["ConfigMap"], docs["NetworkPolicy"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    pdb = docs["PodDisruptionBudget"]
    for sel in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
                pdb["spec"]["selector"]["matchLabels"], np_["spec"]["podSelector"]["matchLabels"]):
        assert sel.items() <= labels.items()
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["grpc"]["port"] == int(cm["data"]["NEXUS_GRPC_PORT"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": int(cm["data"]["NEXUS_GRPC_PORT"]), "http": int(cm["data"]["NEXUS_HTTP_PORT"])}
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    # ConfigMap keys are real settings and validate as such
    fields = set(ServerSettings.model_fields)
    env = dict(cm["data"])
    assert all(k.startswith("NEXUS_") and k[6:].lower() in fields for k in env), sorted(env)
    ServerSettings(**{k[6:].lower(): v for k, v in env.items()})
    # the keys Secret is mounted where NEXUS_KEYS_FILE points, and parses with the real KeyRing
    mount = next(m for m in c["volumeMounts"] if m["name"] == "api-keys")
    vol = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    secret = docs["Secret"]
    assert vol["secret"]["secretName"] == secret["metadata"]["name"]
    key = env["NEXUS_KEYS_FILE"].removeprefix(mount["mountPath"] + "/")
    assert "/" not in key and key in (secret.get("data") or secret.get("stringData"))
    # NetworkPolicy: ingress only from worker pods and Prometheus, on named container ports
    assert np_["spec"]["policyTypes"] == ["Ingress"]
    for rule in np_["spec"]["ingress"]:
        assert all(p["port"] in ports for p in rule["ports"])
        assert all("podSelector" in f for f in rule["from"])
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"


def test_the_kustomize_base_ships_no_usable_key(tmp_path: Path) -> None:
    # keys.example is well-formed but a placeholder: the server refuses to start with it (as the
    # Helm chart refuses to render without keys), so the base cannot deploy a working example key.
    from nexus_sidecar.server.auth import KeyRing

    with pytest.raises(ValueError, match="placeholder key"):
        KeyRing.from_file(K8S / "base" / "keys.example")
    real = tmp_path / "keys"
    real.write_text((K8S / "base" / "keys.example").read_text().replace("REPLACE-ME-example-key-0000000000",
                                                                          "k3Yq9vTtW1pZ0aR7sL2m"))
    assert KeyRing.from_file(real).tenants == ["example"]


def test_serve_refuses_to_start_with_the_placeholder_key() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "nexus_sidecar.cli", "serve", "--device", "cpu", "--grpc-port", "0",
                          "--http-port", "0", "--keys-file", str(K8S / "base" / "keys.example")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "placeholder key" in (out.stdout + out.stderr), out.stdout + out.stderr


def test_gpu_overlay_requests_a_gpu() -> None:
    docs = _by_kind(render("overlays/gpu"))
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert docs["ConfigMap"]["data"]["NEXUS_DEVICE"] == "cuda"
    assert c["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in str(render("base"))


# -------------------------------------------------------------------------------------- Helm

_DIRECTIVE_LINE = re.compile(r"^\s*(\{\{-?.*?-?\}\}\s*)+$")
_DIRECTIVE = re.compile(r"\{\{-?.*?-?\}\}")


def strip_helm(text: str) -> str:
    """Drop lines that are only template actions; replace inline actions with a placeholder."""
    lines = [ln for ln in text.splitlines() if not _DIRECTIVE_LINE.match(ln)]
    return "\n".join(_DIRECTIVE.sub("TPL", ln) for ln in lines) + "\n"


def test_helm_chart_templates_parse_and_mirror_the_kustomize_twin() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "nexus-sidecar"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["gpu"]["enabled"] is False and values["gpu"]["resourceName"] == "nvidia.com/gpu"
    assert set(values["config"]) <= set(ServerSettings.model_fields), "config keys become NEXUS_<NAME>"
    kinds = set()
    for tpl in sorted((CHART / "templates").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(strip_helm(tpl.read_text())) if d]
        assert len(docs) == 1, tpl.name
        doc = docs[0]
        assert {"apiVersion", "kind", "metadata"} <= set(doc), tpl.name
        kinds.add(doc["kind"])
    twin = {d["kind"] for k in KUSTOMIZATIONS for d in render(k)}
    assert kinds == twin, f"helm {sorted(kinds)} vs kustomize {sorted(twin)}"
    dep = (CHART / "templates" / "deployment.yaml").read_text()
    for needle in ("path: /healthz", "path: /readyz", "grpc:", ".Values.gpu.resourceName", "checksum/config"):
        assert needle in dep
    assert "NEXUS_KEYS_FILE" in (CHART / "templates" / "configmap.yaml").read_text()
    assert "monitoring.coreos.com/v1" in (CHART / "templates" / "servicemonitor.yaml").read_text()


def test_latency_panels_rules_and_alerts_cover_step_and_step_batch() -> None:
    """Issue 23, defect 4: StepBatch (what nexus_client sends) was in no latency panel, rule or alert."""
    dash = json.loads(DASHBOARD.read_text())
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    exprs = _dashboard_exprs(dash) + [r["expr"] for r in rules]
    latency = [e for e in exprs if "nexus_request_duration_seconds_bucket" in e]
    assert latency, "no latency query"
    for e in latency:
        assert 'rpc=~"Step|StepBatch"' in e and "by (le, rpc)" in e, e
    alert = next(r for r in rules if r.get("alert") == "NexusStepLatencyP99High")
    assert "{{ $labels.rpc }}" in alert["annotations"]["summary"]
