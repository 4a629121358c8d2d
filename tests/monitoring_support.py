"""What the monitoring tests share: the chart's monitoring files, their translation into a plain Prometheus
configuration (the PodMonitor's relabelings as a scrape job, as the Prometheus Operator would generate it), the
dashboard's queries with its variables filled in, and a real Prometheus (Debian's `prometheus` 2.42) started on
loopback.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "dreambooth-operator"
FILES = CHART / "files"
ALERTS = FILES / "alerts.yaml"
DASHBOARD = FILES / "dashboard.json"
RELABELINGS = FILES / "trainer-relabelings.yaml"
METRICS_DOC = REPO / "docs" / "metrics.md"
ALERT_TESTS = REPO / "tests" / "packaging" / "monitoring" / "alerts-test.yaml"
MONITORING_CRDS = REPO / "tests" / "cluster" / "crds" / "monitoring.coreos.com.yaml"

_CAMEL = {"sourceLabels": "source_labels", "targetLabel": "target_label", "modulus": "modulus",
          "replacement": "replacement", "regex": "regex", "separator": "separator", "action": "action"}  # fmt: skip


def tool_or_skip(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: apt-get install prometheus (scripts/test.sh does, as root)")
    return path


def relabel_configs(podmonitor_relabelings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A PodMonitor's relabelings (camelCase) as Prometheus relabel_configs, with `replace` made explicit."""
    out = []
    for rule in podmonitor_relabelings:
        converted = {_CAMEL[k]: v for k, v in rule.items()}
        converted.setdefault("action", "replace")
        if "action" in rule:
            converted["action"] = str(rule["action"]).lower()
        out.append(converted)
    return out


def trainer_scrape_job(podmonitor: dict[str, Any], sd_url: str, interval: str = "1s") -> dict[str, Any]:
    """The scrape job the Prometheus Operator makes of the chart's PodMonitor: pod discovery, keep the pods its
    selector matches and the named port, then the PodMonitor's own relabelings.

    Discovery is HTTP SD at `sd_url` (:class:`PodDiscovery`): Debian's Prometheus is built without Kubernetes
    discovery, so the test serves the pod role's meta labels itself, from the real apiserver's pods.
    """
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    keep: list[dict[str, Any]] = []
    for label, value in podmonitor["spec"]["selector"]["matchLabels"].items():
        keep.append({"action": "keep", "source_labels": [pod_label_meta(label)], "regex": re.escape(str(value))})
    keep.append({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                 "regex": endpoint["port"]})  # fmt: skip
    return {
        "job_name": "dreambooth-trainers",
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "metrics_path": endpoint["path"],
        "http_sd_configs": [{"url": sd_url, "refresh_interval": interval}],
        "relabel_configs": keep + relabel_configs(endpoint["relabelings"]),
    }


def pod_label_meta(label: str) -> str:
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)


def pod_targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HTTP SD target groups with the meta labels Prometheus's kubernetes_sd `pod` role gives each container
    port of a pod that has an IP (prometheus/discovery/kubernetes/pod.go)."""
    groups = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        ip = status.get("podIP")
        if not ip:
            continue
        common = {
            "__meta_kubernetes_namespace": meta["namespace"],
            "__meta_kubernetes_pod_name": meta["name"],
            "__meta_kubernetes_pod_ip": ip,
            "__meta_kubernetes_pod_phase": status.get("phase", ""),
            "__meta_kubernetes_pod_node_name": (pod.get("spec") or {}).get("nodeName", ""),
            "__meta_kubernetes_pod_uid": meta.get("uid", ""),
        }
        for key, value in (meta.get("labels") or {}).items():
            common[pod_label_meta(key)] = value
            common[pod_label_meta(key).replace("_pod_label_", "_pod_labelpresent_", 1)] = "true"
        for c in pod["spec"]["containers"]:
            for port in c.get("ports") or []:
                groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": {
                    **common, "__meta_kubernetes_pod_container_name": c["name"],
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                    "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP")}})  # fmt: skip
    return groups


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(variables: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, Grafana variables replaced (`$__rate_interval` by `variables`)."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(variables, key=len, reverse=True):
                expr = expr.replace(f"${name}", variables[name])
            out.append((panel["title"], expr))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric families a PromQL expression reads (our names all start with dreambooth_)."""
    # Label names (matchers, by/on/without lists) are no metric names: drop them first.
    bare = re.sub(r"\{[^}]*\}", "", expr)
    bare = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    names = set(re.findall(r"\bdreambooth_[a-z0-9_]+", bare))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) else n for n in names}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def documented_metrics() -> set[str]:
    """Metric names in the first column of docs/metrics.md's tables."""
    row = r"^\| `(dreambooth_[a-z0-9_]+)` \| (?:gauge|counter|histogram|summary) \|"
    return set(re.findall(row, METRICS_DOC.read_text(), flags=re.M))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A real Prometheus on 127.0.0.1 with the given scrape jobs, its data in `workdir`."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]]) -> None:
        self.binary = tool_or_skip("prometheus")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                               "scrape_configs": scrape_configs}))  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"prometheus not ready in 60 s:\n{self.log.read_text()[-3000:]}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as resp:
            return json.loads(resp.read())["data"]["activeTargets"]

    def series_names(self) -> set[str]:
        with urllib.request.urlopen(f"{self.url}/api/v1/label/__name__/values", timeout=10) as resp:
            return set(json.loads(resp.read())["data"])

    def wait_for(self, expr: str, timeout: float, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: no data for {expr!r} in {timeout:.0f} s; targets: {self.targets()}")
            time.sleep(1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([tool_or_skip("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    if done.returncode != 0:
        print(done.stdout, done.stderr, file=sys.stderr)
    return done
