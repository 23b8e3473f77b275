"""The Kubernetes manifests and the Helm chart in deploy/, checked without a cluster.

Every object is validated offline against the Kubernetes API schemas (``kubernetes-validate``, strict:
unknown fields fail) for the oldest version with native sidecars on by default (1.29) and the newest
the validator ships. Then the contracts a cluster would only reveal at run time: the sidecar is an
init container with ``restartPolicy: Always``; probes ask ``/healthz`` on a declared port; the grace
period covers the preStop pause, ``drain_timeout`` and a margin; Services and selectors find the
pods they mean and no others; every ``SPECPROXY_*`` variable is a real setting with a valid value.
Each manifest's proxy is then started as its pod would start it (same variables, same probe path)
and asked the probe's question. The chart is rendered with ``helm template`` when a ``helm``
binary is on PATH, else with Helm's own engine from the ``helm-python-sdk`` package; it skips when
neither is installed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from specproxy.config import ENV_PREFIX, FIELDS, load_settings
from specproxy.outcome import Outcome
from specproxy.testing import ProxyHandle, SimHandle, run_proxy, run_sim
from specproxy.usage import Usage
from tests.conftest import CONTEXT, KEY_A, MODEL, eventually, headers, question_body, warm_body
from tests.redis_server import REDIS_SERVER, RedisServer

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
CHART = ROOT / "deploy" / "helm" / "specproxy"
# Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
GRACE_MARGIN_S = 5  # at least this much of the grace period is left after preStop and the drain
# The OTEL_* variables the chart may set: read by the OpenTelemetry SDK (docs/observability.md).
OTEL_ENV = {"OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SDK_DISABLED"}


# --- loading and validating -------------------------------------------------------------------------
def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def manifest(name: str) -> list[dict[str, Any]]:
    return load_docs((KUBE / name).read_text(encoding="utf-8"))


def validate(docs: list[dict[str, Any]]) -> None:
    assert docs
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} at {where} (k8s {version}): "
                                     f"{exc.message}") from None


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
    return spec


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = (doc["metadata"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"])[
        "labels"
    ]
    return labels


def proxy_container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(doc)
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "specproxy"]
    assert len(found) == 1
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> literal value, or the valueFrom object."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in env_of(container).items() if isinstance(v, str)}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- the contracts ------------------------------------------------------------------------------------
def check_proxy_pod(doc: dict[str, Any]) -> None:
    """Probes on /healthz at a declared port; grace >= preStop + drain_timeout + margin; real settings."""
    container = proxy_container(doc)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert get["port"] in ports or get["port"] in ports.values(), probe
    env = env_of(container)
    for name in env:
        assert name.startswith(ENV_PREFIX) or name in OTEL_ENV, f"unexpected variable {name}"
        if name.startswith(ENV_PREFIX):
            assert name[len(ENV_PREFIX):].lower() in FIELDS, f"{name} is not a setting"
    # Literal values load as settings (the same conversion and bounds a real start applies).
    settings = load_settings(None, env=literal_env(container), read_default_file=False)
    pre_stop = 0
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is not None:
        command = hook["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop = int(command[1])
    grace = pod_spec(doc)["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + settings.drain_timeout + GRACE_MARGIN_S, (grace, pre_stop, settings.drain_timeout)
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsUser"] == 10001  # the image's user (Dockerfile)
    assert container["resources"]["limits"]["memory"]


def check_services(docs: list[dict[str, Any]]) -> None:
    """Each Service selects at least one workload, and only workloads with the port it targets."""
    workloads = [d for d in docs if d["kind"] in ("Deployment", "Pod")]
    for deployment in of_kind(docs, "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selects(selector, pod_labels(deployment))
        for other in workloads:
            if other is not deployment:
                assert not selects(selector, pod_labels(other)), (
                    f"{deployment['metadata']['name']}'s selector also matches {other['metadata']['name']}"
                )
    for service in of_kind(docs, "Service"):
        chosen = [w for w in workloads if selects(service["spec"]["selector"], pod_labels(w))]
        assert chosen, f"Service {service['metadata']['name']} selects nothing"
        for w in chosen:
            named = {p["name"] for c in pod_spec(w)["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in named, (service["metadata"]["name"], port)
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        chosen = [w for w in workloads if selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(w))]
        assert len(chosen) == 1


def service_url_resolves(docs: list[dict[str, Any]], url: str, port_name: str) -> None:
    """``redis://NAME:PORT/..`` names a Service of these docs, on one of its ports."""
    host, port = url.split("://", 1)[1].split("/", 1)[0].split(":")
    service = one(docs, "Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"] if p["name"] == port_name]


# --- the plain manifests ------------------------------------------------------------------------------
def test_sidecar_pod_is_valid_and_the_proxy_is_a_native_sidecar() -> None:
    docs = manifest("sidecar-pod.yaml")
    validate(docs)
    pod = one(docs, "Pod")
    spec = pod_spec(pod)
    sidecar = [c for c in spec["initContainers"] if c["name"] == "specproxy"]
    assert len(sidecar) == 1 and sidecar[0]["restartPolicy"] == "Always"
    assert "startupProbe" in sidecar[0]  # the app starts only once the proxy answers
    assert all(c["name"] != "specproxy" for c in spec["containers"])
    check_proxy_pod(pod)
    # The app is pointed at the sidecar's port on localhost.
    [app] = [c for c in spec["containers"] if c["name"] == "app"]
    port = sidecar[0]["ports"][0]["containerPort"]
    assert env_of(app)["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)


def test_replicas_share_state_through_the_redis_the_manifest_deploys() -> None:
    docs = manifest("replicas.yaml")
    validate(docs)
    check_services(docs)
    proxy = one(docs, "Deployment", "specproxy")
    assert proxy["spec"]["replicas"] > 1
    check_proxy_pod(proxy)
    env = literal_env(proxy_container(proxy))
    assert env["SPECPROXY_REGISTRY"] == "redis"
    service_url_resolves(docs, env["SPECPROXY_REDIS_URL"], "redis")
    redis = one(docs, "Deployment", "specproxy-redis")
    assert redis["spec"]["replicas"] == 1
    args = pod_spec(redis)["containers"][0]["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] < proxy["spec"]["replicas"]


# --- started as the pod would start it ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def sim_url() -> AsyncIterator[str]:
    async with run_sim(time_scale=0.0) as sim:
        yield sim.url


async def run_as_pod(container: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """``specproxy serve`` with the container's variables (``overrides`` win), asked its readiness
    probe's question; then SIGTERM, which must end it cleanly. Returns the probe's JSON."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(literal_env(container))
    env.update(overrides, SPECPROXY_PORT=str(port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "specproxy.cli", "serve", "--host", "127.0.0.1", *container.get("args", []), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"listening on" in line, line
        probe = container["readinessProbe"]["httpGet"]
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{probe['path']}") as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        return body
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_sidecar_container_starts_and_answers_its_probe(sim_url: str) -> None:
    container = proxy_container(one(manifest("sidecar-pod.yaml"), "Pod"))
    health = await run_as_pod(container, {"SPECPROXY_UPSTREAM": sim_url})
    assert health["status"] == "ok" and health["registry"] == "memory"


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)")
async def test_a_replica_starts_shares_state_through_redis_and_answers_its_probe(sim_url: str) -> None:
    container = proxy_container(one(manifest("replicas.yaml"), "Deployment", "specproxy"))
    server = RedisServer()
    await server.start()
    try:
        health = await run_as_pod(container, {"SPECPROXY_UPSTREAM": sim_url, "SPECPROXY_REDIS_URL": server.url})
    finally:
        await server.close()
    assert health["status"] == "ok" and health["registry"] == "redis" and health["registry_degraded"] is False


# --- the Helm chart -----------------------------------------------------------------------------------
class RenderError(Exception):
    pass


def _helm_renderer() -> tuple[str, Any] | None:
    helm = shutil.which("helm")
    if helm:
        return "helm", helm
    try:
        import helm_python
    except (ImportError, OSError):
        return None
    return "helm-python-sdk", helm_python


RENDERER = _helm_renderer()
needs_helm = pytest.mark.skipif(
    RENDERER is None, reason="neither a helm binary nor helm-python-sdk (Helm's engine) is installed"
)


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``helm template sp deploy/helm/specproxy --namespace default`` with ``values``."""
    assert RENDERER is not None
    how, tool = RENDERER
    if how == "helm":
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            json.dump(values or {}, f)
        try:
            done = subprocess.run([tool, "template", "sp", str(CHART), "--namespace", "default", "-f", f.name],
                                  capture_output=True, text=True, timeout=60, check=False)
        finally:
            os.unlink(f.name)
        if done.returncode != 0:
            raise RenderError(done.stderr)
        return load_docs(done.stdout)
    try:
        with tool.Chart.load(str(CHART)) as chart:
            chart.validate_schema(values or {})
            rendered = chart.render(values or {}, name="sp", namespace="default")
    except tool.HelmError as exc:
        raise RenderError(str(exc)) from None
    return [d for name, text in sorted(rendered.items()) if name.endswith(".yaml") for d in load_docs(text)]


@pytest.fixture(scope="module")
def default_render() -> Iterator[list[dict[str, Any]]]:
    if RENDERER is None:
        pytest.skip("neither a helm binary nor helm-python-sdk (Helm's engine) is installed")
    yield render()


@needs_helm
def test_chart_lints_clean() -> None:
    assert RENDERER is not None
    how, tool = RENDERER
    if how == "helm":
        done = subprocess.run([tool, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return
    report = tool.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert report["total_charts_linted"] == 1


@needs_helm
def test_chart_defaults_render_replicas_sharing_a_redis(default_render: list[dict[str, Any]]) -> None:
    docs = default_render
    validate(docs)
    check_services(docs)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Deployment", "PodDisruptionBudget", "Service",
                                               "Service"]
    proxy = one(docs, "Deployment", "sp-specproxy")
    check_proxy_pod(proxy)
    assert proxy["spec"]["replicas"] == 2
    env = literal_env(proxy_container(proxy))
    assert env["SPECPROXY_REGISTRY"] == "redis"
    service_url_resolves(docs, env["SPECPROXY_REDIS_URL"], "redis")
    assert "SPECPROXY_ADMIN_TOKEN" not in env_of(proxy_container(proxy))
    assert proxy_container(proxy)["image"] == "specproxy:0.1.0"  # the chart's appVersion


@needs_helm
def test_chart_single_replica_without_redis() -> None:
    docs = render({"replicaCount": 1, "redis": {"enabled": False}})
    validate(docs)
    check_services(docs)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    env = env_of(proxy_container(one(docs, "Deployment")))
    assert "SPECPROXY_REGISTRY" not in env and "SPECPROXY_REDIS_URL" not in env


@needs_helm
def test_chart_refuses_replicas_without_shared_state() -> None:
    with pytest.raises(RenderError, match="needs shared warm state"):
        render({"replicaCount": 3, "redis": {"enabled": False}})


@needs_helm
def test_chart_external_redis_from_a_secret() -> None:
    docs = render({"redis": {"enabled": False, "urlSecret": {"name": "my-redis", "key": "url"}}})
    validate(docs)
    assert not [d for d in docs if "redis" in d["metadata"]["name"]]
    env = env_of(proxy_container(one(docs, "Deployment")))
    assert env["SPECPROXY_REGISTRY"] == "redis"
    assert env["SPECPROXY_REDIS_URL"] == {"secretKeyRef": {"name": "my-redis", "key": "url"}}


@needs_helm
def test_chart_admin_token_becomes_a_secret_the_pod_reads() -> None:
    docs = render({"adminToken": {"value": "s3cret-admin"}})
    validate(docs)
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["token"]) == b"s3cret-admin"
    ref = env_of(proxy_container(one(docs, "Deployment", "sp-specproxy")))["SPECPROXY_ADMIN_TOKEN"]
    assert ref == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "token"}}
    # Naming an existing Secret creates none.
    docs = render({"adminToken": {"existingSecret": "ops-admin", "value": ""}})
    assert of_kind(docs, "Secret") == []
    ref = env_of(proxy_container(one(docs, "Deployment", "sp-specproxy")))["SPECPROXY_ADMIN_TOKEN"]
    assert ref == {"secretKeyRef": {"name": "ops-admin", "key": "token"}}


@needs_helm
def test_chart_grace_period_follows_the_drain_timeout_and_extra_settings_pass_through() -> None:
    docs = render({"drainTimeout": 120, "extraEnv": {"SPECPROXY_NEXT_TURN": "true", "SPECPROXY_MAX_HOLD": 45}})
    validate(docs)
    proxy = one(docs, "Deployment", "sp-specproxy")
    check_proxy_pod(proxy)
    assert pod_spec(proxy)["terminationGracePeriodSeconds"] == 120 + 5 + 10
    settings = load_settings(None, env=literal_env(proxy_container(proxy)), read_default_file=False)
    assert settings.drain_timeout == 120 and settings.next_turn is True and settings.max_hold == 45


@needs_helm
def test_chart_otel_values_set_the_tracing_variables() -> None:
    docs = render({"otel": {"enabled": True, "endpoint": "http://otel-collector:4318", "serviceName": "edge-proxy"}})
    validate(docs)
    proxy = one(docs, "Deployment", "sp-specproxy")
    check_proxy_pod(proxy)
    env = literal_env(proxy_container(proxy))
    assert env["SPECPROXY_OTEL_ENABLED"] == "true"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["OTEL_SERVICE_NAME"] == "edge-proxy"


@needs_helm
def test_chart_schema_rejects_a_bad_value() -> None:
    with pytest.raises(RenderError):
        render({"extraEnv": {"not a variable": "x"}})
    with pytest.raises(RenderError):
        render({"upstream": "api.anthropic.com"})  # no scheme


# --- the Grafana dashboard and the Prometheus rules name what the proxy exports -----------------------
GRAFANA = ROOT / "deploy" / "grafana" / "specproxy-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yaml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
# Grafana's variables, as a query sent to Prometheus would have them.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "6h", "$job": ".*", "$instance": ".*"}
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus at scrape time
METRIC = re.compile(r"\bspecproxy_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(specproxy_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@dataclass
class Exported:
    """What one real proxy's /metrics exported: sample names, label names per sample name, values."""

    text: str
    labels: dict[str, set[str]]
    values: dict[str, dict[str, set[str]]]  # sample name -> label -> values seen
    samples: dict[str, float]  # unlabelled samples

    def names(self) -> set[str]:
        return set(self.labels)


_EXPORTED: list[Exported] = []


async def drive_traffic(http: aiohttp.ClientSession, proxy: ProxyHandle, sim: SimHandle) -> None:
    """A little of everything: prewarm, hit (JSON and stream), held, miss, bypass, next-turn, mismatch."""

    async def post(path: str, body: dict[str, Any], **extra: str) -> aiohttp.ClientResponse:
        async with http.post(proxy.url + path, data=json.dumps(body), headers=headers(KEY_A, **extra)) as r:
            await r.read()
            return r

    ctx = {name: CONTEXT.replace("function_", f"{name}_") for name in ("held", "miss", "gone")}
    assert (await post("/prewarm?wait=1", warm_body())).status == 200
    assert (await post("/v1/messages", question_body())).headers["X-Cache-Warm"] == "hit"
    assert (await post("/v1/messages", question_body(stream=True))).headers["X-Cache-Warm"] == "hit"
    r = await post("/v1/messages", question_body("next?"), **{"X-Cache-Warm-Next": "1"})
    assert r.headers["X-Cache-Warm"] == "hit"
    assert (await post("/prewarm", warm_body(ctx["held"]), **{"x-sim-gate": "g"})).status == 202
    held = asyncio.ensure_future(post("/v1/messages", question_body(context=ctx["held"])))
    await eventually(lambda: proxy.held == 1)
    await sim.open_gate("g")
    assert (await held).headers["X-Cache-Warm"] == "held"
    assert (await post("/v1/messages", question_body(context=ctx["miss"]))).headers["X-Cache-Warm"] == "miss"
    bypass = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert (await post("/v1/messages", bypass)).headers["X-Cache-Warm"] == "bypass"
    assert (await post("/prewarm?wait=1", warm_body(ctx["gone"]))).status == 200
    await sim.reset()  # the upstream forgets: the next hit is a mismatch
    assert (await post("/v1/messages", question_body(context=ctx["gone"]))).headers["X-Cache-Warm"] == "hit"


async def exported() -> Exported:
    """Scrape a real proxy in front of the simulator after :func:`drive_traffic` (once per session)."""
    if not _EXPORTED:
        async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url, max_hold=10.0) as proxy, \
                aiohttp.ClientSession() as http:
            await drive_traffic(http, proxy, sim)
            async with http.get(proxy.url + "/metrics") as r:
                assert r.status == 200
                text = await r.text()
        labels: dict[str, set[str]] = {}
        values: dict[str, dict[str, set[str]]] = {}
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if not family.samples:  # a labelled family nothing has touched yet: its names, no labels
                suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
                for suffix in suffixes:
                    labels.setdefault(family.name + suffix, set())
            for s in family.samples:
                labels.setdefault(s.name, set()).update(s.labels)
                for k, v in s.labels.items():
                    values.setdefault(s.name, {}).setdefault(k, set()).add(v)
                if not s.labels:
                    samples[s.name] = s.value
        _EXPORTED.append(Exported(text, labels, values, samples))
    return _EXPORTED[0]


def grafana_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(GRAFANA.read_text(encoding="utf-8"))
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def check_query(where: str, expr: str, exp: Exported) -> None:
    """Every metric the query names is exported; its label matchers and groupings use real labels;
    ``outcome`` and ``kind`` values are ones the proxy uses."""
    names = METRIC.findall(expr)
    assert names, f"{where}: names no specproxy metric: {expr}"
    for name in names:
        assert name in exp.names(), f"{where}: {name} is not exported (exported: {sorted(exp.names())})"
    known_values = {"outcome": {str(o) for o in Outcome}, "kind": set(Usage().as_dict())}
    for name, matchers in SELECTOR.findall(expr):
        for label, _, value in MATCHER.findall(matchers):
            if label in SCRAPE_LABELS:
                continue
            if exp.labels[name]:  # nothing touched it yet when empty: its labels are not visible
                assert label in exp.labels[name], f"{where}: {name} has no label {label}"
            if label in known_values:
                for alternative in value.split("|"):
                    assert alternative in known_values[label], f"{where}: {label}={alternative!r} never occurs"
    if not all(exp.labels[n] for n in names):
        return  # a metric nothing touched yet shows no labels: its groupings cannot be checked
    used = set().union(*(exp.labels[n] for n in names)) | SCRAPE_LABELS
    for group in GROUPING.findall(expr):
        for label in (g.strip() for g in group.split(",") if g.strip()):
            assert label in used, f"{where}: groups by {label}, which none of {names} has"


def test_dashboard_is_a_grafana_dashboard_with_every_promised_panel() -> None:
    dashboard = json.loads(GRAFANA.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"], panel["title"]
    queries = " ".join(expr for _, expr in grafana_queries())
    # outcomes, hold time, tokens by kind, dollars spent and saved, wasted warms, mismatches, degraded
    for metric in ("specproxy_requests_total", "specproxy_hold_seconds_bucket", "specproxy_tokens_total",
                   "specproxy_dollars_spent_total", "specproxy_dollars_saved_total", "specproxy_warms_wasted_total",
                   "specproxy_warms_wasted_dollars_total", "specproxy_warm_mismatch_total",
                   "specproxy_registry_degraded"):
        assert metric in queries, metric


async def test_every_dashboard_query_names_metrics_and_labels_the_proxy_exports() -> None:
    exp = await exported()
    queries = grafana_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        check_query(f"panel {title!r}", expr, exp)


async def test_every_alert_names_metrics_and_labels_the_proxy_exports() -> None:
    exp = await exported()
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {"SpecproxyWarmMismatches", "SpecproxyWastedWarmSpend",
                                           "SpecproxyRegistryDegraded"}
    for rule in rules:
        check_query(f"alert {rule['alert']}", rule["expr"], exp)
        assert rule["labels"]["severity"] in ("info", "warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


async def test_the_scrape_has_no_created_series_and_counts_what_the_traffic_did() -> None:
    exp = await exported()
    assert "_created" not in exp.text
    outcomes = exp.values["specproxy_requests_total"]["outcome"]
    assert {"hit", "held", "miss", "bypass", "prewarm-sent"} <= outcomes
    assert exp.samples["specproxy_warm_mismatch_total"] == 1
    assert exp.values["specproxy_next_turn_warms_total"]["result"] == {"sent"}
    assert exp.samples["specproxy_registry_degraded"] == 0
    assert exp.samples["specproxy_hold_seconds_count"] == 1


async def test_a_wasted_warm_adds_what_it_cost_to_the_wasted_dollars() -> None:
    # A TTL scale this small makes the 5-minute TTL pass in about 30 ms.
    async with run_sim(time_scale=0.0) as sim, run_proxy(sim.url, cache_ttl_scale=0.0001) as proxy, \
            aiohttp.ClientSession() as http:
        async with http.post(proxy.url + "/prewarm?wait=1", data=json.dumps(warm_body()), headers=headers()) as r:
            assert r.status == 200

        async def scrape() -> dict[str, float]:
            async with http.get(proxy.url + "/metrics") as r:
                return {s.name: s.value for f in text_string_to_metric_families(await r.text()) for s in f.samples
                        if not s.labels}

        async def wasted() -> bool:
            return (await scrape())["specproxy_warms_wasted_total"] == 1

        await eventually(wasted)
        m = await scrape()
        [warm] = [e for e in await sim.requests()]
    # The warm is the only thing that spent money: all of it was wasted.
    assert m["specproxy_warms_wasted_dollars_total"] == pytest.approx(m["specproxy_dollars_spent_total"])
    assert m["specproxy_warms_wasted_dollars_total"] > 0
    assert warm["max_tokens"] == 0


@needs_promtool
def test_promtool_accepts_the_rules_and_every_alert_fires_on_its_unit_test_series() -> None:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout
    done = subprocess.run([PROMTOOL, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {t["alertname"] for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in test["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}  # every alert has a unit test


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    rules = []
    for i, (_, expr) in enumerate(grafana_queries()):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    done = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
