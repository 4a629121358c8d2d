"""Monitoring end to end: a real Prometheus (Debian's 2.42, on loopback) scrapes the real operator and rank 0 of a
real training job in the test cluster, with the relabelings of the PodMonitor the chart renders; every query of
the chart's dashboard returns data for that job, every metric its rules and dashboard use appears in a live
scrape, and with LOG_FORMAT=json the job's pod logs are JSON with job, namespace, attempt, rank and step.
`helm install` with every monitoring option on is accepted by the apiserver (minimal hand-written CRDs of the
Prometheus Operator kinds: tests/cluster/crds/monitoring.coreos.com.yaml).

Not covered: Grafana (not installable here) — how it renders the dashboard JSON is unverified; and Prometheus's
own Kubernetes discovery (Debian builds Prometheus without it): the test serves the pod role's meta labels over
HTTP SD from the apiserver's pods, and the PodMonitor's selector and relabelings do the rest inside Prometheus.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from k8s_harness import Cluster, wait_until
from operator_support import Jobs, OperatorProcess, dreambooth_job, tiny_training
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from monitoring_support import (  # noqa: E402
    CHART,
    MONITORING_CRDS,
    Prometheus,
    alert_rules,
    dashboard_queries,
    metric_names,
    pod_targets,
    tool_or_skip,
    trainer_scrape_job,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Far more steps than the test watches (it never waits for the end): attempt 2 is still running while every
# query and the live scrape are checked, however slow the machine.
STEPS = 60


def render(cluster: Cluster, namespace: str, *values: str) -> list[dict[str, Any]]:
    proc = cluster.helm("template", "dbo", str(CHART), "--namespace", namespace, *values)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


class PodDiscovery:
    """HTTP SD: the pods of one namespace, as Prometheus's kubernetes_sd pod role would describe them."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        api = cluster.kube_api

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                pods = api.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
                body = json.dumps(pod_targets([p for p in pods if not p["metadata"].get("deletionTimestamp")]))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sd"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def monitored(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[tuple[Jobs, Prometheus]]:
    tool_or_skip("prometheus")
    docs = render(cluster, namespace, "--set", "monitoring.podMonitor.enabled=true",
                  "--set", "metrics.serviceMonitor.enabled=true")  # fmt: skip
    podmonitor = next(d for d in docs if d["kind"] == "PodMonitor")
    (sm_endpoint,) = next(d for d in docs if d["kind"] == "ServiceMonitor")["spec"]["endpoints"]
    op = OperatorProcess(cluster, namespace, tmp_path, LOG_FORMAT="json").start()
    sd = PodDiscovery(cluster, namespace)
    prom = Prometheus(tmp_path / "prometheus", [
        # What the ServiceMonitor asks for, pointed at the operator process.
        {"job_name": "dreambooth-operator", "scrape_interval": "1s", "scrape_timeout": "1s",
         "metrics_path": sm_endpoint["path"], "honor_labels": sm_endpoint["honorLabels"],
         "static_configs": [{"targets": [f"127.0.0.1:{op.port}"]}]},
        trainer_scrape_job(podmonitor, sd.url),
    ])  # fmt: skip
    try:
        prom.start()
        yield Jobs(cluster, namespace, op), prom
    finally:
        prom.stop()
        sd.close()
        op.stop()


def monitored_job(name: str, storage: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    bucket = storage["bucket"]
    training = tiny_training(name, bucket, STEPS)
    # Slow steps (the trainer's test knob, never changes the math) so Prometheus sees the job run.
    env = {"MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DREAMBOOTH_TEST_STEP_DELAY_SECONDS": "1"}
    return dreambooth_job(
        name, training, nodes=1,
        requests_={"cpu": "500m", "memory": "512Mi", "ephemeral-storage": "1Gi"},
        pod_template={"env": [{"name": k, "value": v} for k, v in env.items()]},
        run_policy={"terminationGracePeriodSeconds": 60, "backoffLimit": 0, "maxPreemptions": 3},
        storage=storage["spec"],
    )  # fmt: skip


def scraped_families(url: str) -> set[str]:
    s = requests.Session()
    s.trust_env = False
    names = set()
    for family in text_string_to_metric_families(s.get(url, timeout=5).text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        names.add(family.name)
    return names


def test_prometheus_scrapes_the_job_and_every_dashboard_query_has_data(
    monitored: tuple[Jobs, Prometheus],
    storage: dict[str, Any],  # noqa: F811
) -> None:
    jobs, prom = monitored
    ns = jobs.ns
    jobs.create(monitored_job("watched", storage))
    first = jobs.wait(
        "watched", lambda s: (s.get("lastCheckpoint") or {}).get("step") and s.get("phase") == "Running", 240,
        "a first checkpoint",
    )  # fmt: skip
    assert first["attempt"] == 1
    # Series of the first attempt's rank 0, labelled from its pod's labels by the PodMonitor's relabelings.
    labels = f'namespace="{ns}", dreambooth_job="watched"'
    (series,) = prom.wait_for(f'dreambooth_step{{{labels}, attempt="1"}}', 60, "rank 0 of attempt 1 scraped")
    assert series["metric"]["pod"] == "watched-a1-0"
    assert "dreambooth_build_info" in {m for m in prom.series_names()}

    # A preemption: the operator counts it by cause, and the next attempt resumes under a new attempt label.
    (pod,) = jobs.pods("watched", attempt=1)
    jobs.cluster.preempt(ns, pod["metadata"]["name"])
    jobs.wait("watched", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running", 180, "attempt 2 running")
    prom.wait_for(f'dreambooth_step{{{labels}, attempt="2"}} > 0', 120, "attempt 2's steps")
    prom.wait_for(f'dreambooth_operator_preemptions_total{{namespace="{ns}", reason="DisruptionTarget"}}', 30,
                  "the preemption by cause")  # fmt: skip

    variables = {"namespace": ns, "job": "watched", "__rate_interval": "1m", "datasource": "prometheus"}
    missing = []
    for title, expr in dashboard_queries(variables):
        try:
            prom.wait_for(expr, 60, title)
        except AssertionError:
            missing.append(f"{title}: {expr}")
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)

    # Every metric the rules and the dashboard read is in a live scrape of the operator or of rank 0.
    (rank0,) = [
        p for p in jobs.pods("watched", attempt=2) if p["metadata"]["labels"]["dreambooth.dev/pod-index"] == "0"
    ]
    live = scraped_families(f"http://127.0.0.1:{jobs.operator.port}/metrics")  # type: ignore[union-attr]
    live |= scraped_families(f"http://{rank0['status']['podIP']}:8080/metrics")
    used = set().union(*(metric_names(r["expr"]) for r in alert_rules()))
    used |= set().union(*(metric_names(e) for _, e in dashboard_queries(variables)))
    assert not used - live, f"used by rules/dashboard but not scraped: {sorted(used - live)}"

    # LOG_FORMAT=json reached the pods: the trainer's log lines are JSON with who and which step.
    log = jobs.cluster.pod_log(ns, rank0["metadata"]["name"])
    not_json = [line for line in log.splitlines() if line.strip() and not line.startswith("{")]
    assert not not_json, f"{len(not_json)} lines of the pod log are not JSON, e.g.:\n" + "\n".join(not_json[:10])
    docs = [json.loads(line) for line in log.splitlines() if line.strip()]
    workers = [d for d in docs if d.get("role") == "worker"]
    assert workers, log[-3000:]
    assert {(d["job"], d["namespace"], d["attempt"], d["rank"]) for d in workers} == {("watched", ns, 2, 0)}
    assert any(isinstance(d["step"], int) and d["step"] > 0 for d in workers)
    assert any(d.get("role") == "launcher" for d in docs)
    # The operator's own lines are JSON too.
    op_log = jobs.operator.log_path.read_text()  # type: ignore[union-attr]
    op_lines = [json.loads(line) for line in op_log.splitlines() if line.strip()]  # every line, or this raises
    assert op_lines and all(d["component"] == "operator" for d in op_lines)


def test_helm_install_with_every_monitoring_option_is_accepted(cluster: Cluster) -> None:
    cluster.install_crds(MONITORING_CRDS)
    ns = cluster.ensure_namespace()
    values = ["--set", "monitoring.podMonitor.enabled=true", "--set", "monitoring.dashboard.enabled=true",
              "--set", "monitoring.alerts.enabled=true", "--set", "metrics.serviceMonitor.enabled=true",
              "--set", "logFormat=json", "--set", f"watchNamespaces={{{ns}}}",
              # The Deployment is not what this test is about: an image no node pulls keeps it from running.
              "--set", "image.repository=host.invalid/not-pulled"]  # fmt: skip
    release = "mon"
    try:
        proc = cluster.helm("install", release, str(CHART), "--namespace", ns, *values, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        api = cluster.kube_api
        base = f"/apis/monitoring.coreos.com/v1/namespaces/{ns}"
        pm = api.get(f"{base}/podmonitors/{release}-dreambooth-operator-trainers")
        assert pm["spec"]["namespaceSelector"] == {"matchNames": [ns]}
        rule = api.get(f"{base}/prometheusrules/{release}-dreambooth-operator")
        assert len([r for g in rule["spec"]["groups"] for r in g["rules"]]) == 5
        assert api.get(f"{base}/servicemonitors/{release}-dreambooth-operator")["spec"]["endpoints"][0]["honorLabels"]
        cm = api.get(f"/api/v1/namespaces/{ns}/configmaps/{release}-dreambooth-operator-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and json.loads(cm["data"]["dashboard.json"])
        dep = api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{release}-dreambooth-operator")
        env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["LOG_FORMAT"] == "json"
    finally:
        cluster.helm("uninstall", release, "--namespace", ns, check=False)
        wait_until(lambda: cluster.helm("status", release, "--namespace", ns, check=False).returncode != 0, 60,
                   0.5, "helm uninstall")  # fmt: skip
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
