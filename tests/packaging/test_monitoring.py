"""The chart's monitoring options rendered by the real helm and checked by the real Prometheus tools: the alerts
pass `promtool check rules` and `promtool test rules` (each alert: a series that fires and one that must not),
the PodMonitor's relabelings make a configuration `promtool check config` accepts, every dashboard query is valid
PromQL, and docs/metrics.md lists exactly the metrics the operator and the trainer expose.

That the queries return data and that the names appear in a live scrape is tests/cluster/test_monitoring.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pkg_support import KUBE_VERSIONS, REPO, Helm, by_kind, one

from dreambooth_operator.__main__ import Settings

sys.path.insert(0, str(REPO / "tests"))

from monitoring_support import (  # noqa: E402
    ALERT_TESTS,
    ALERTS,
    DASHBOARD,
    alert_rules,
    dashboard_queries,
    documented_metrics,
    metric_names,
    promtool,
    trainer_scrape_job,
)

pytestmark = pytest.mark.packaging

ON = ["--set", "monitoring.podMonitor.enabled=true", "--set", "monitoring.dashboard.enabled=true",
      "--set", "monitoring.alerts.enabled=true", "--set", "metrics.serviceMonitor.enabled=true",
      "--set", "logFormat=json"]  # fmt: skip
EXAMPLE = REPO / "examples" / "monitoring" / "networkpolicy-metrics.yaml"
# Dashboard variables as Grafana fills them in.
VARIABLES = {"namespace": "team-a", "job": "dog", "__rate_interval": "1m", "datasource": "prometheus"}


@pytest.fixture(scope="module")
def docs(chart: Helm) -> list[dict[str, Any]]:
    return chart.template(*ON, "--set", "watchNamespaces={team-a,team-b}", namespace="ml-platform")


def test_off_by_default(chart: Helm) -> None:
    kinds = {d["kind"] for d in chart.template()}
    assert not kinds & {"PodMonitor", "PrometheusRule", "ServiceMonitor"}
    assert not [d for d in by_kind(chart.template(), "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]


def test_podmonitor_scrapes_rank_0_of_jobs_in_the_watched_namespaces(docs: list[dict[str, Any]]) -> None:
    pm = one(docs, "PodMonitor")
    assert pm["metadata"]["namespace"] == "ml-platform"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    assert pm["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "dreambooth-operator", "dreambooth.dev/pod-index": "0"}  # fmt: skip
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    # The port name the operator gives the trainer container (resources.build_pod).
    from dreambooth_operator import resources

    pod = resources.build_pod(_a_job(), 1, 0)
    assert endpoint["port"] in [p["name"] for p in pod["spec"]["containers"][0]["ports"]]
    assert pod["metadata"]["labels"]["dreambooth.dev/pod-index"] == "0"
    targets = {r["targetLabel"] for r in endpoint["relabelings"]}
    assert {"namespace", "dreambooth_job", "attempt"} <= targets


def test_podmonitor_relabelings_make_a_valid_prometheus_config(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({"scrape_configs": [trainer_scrape_job(one(docs, "PodMonitor"), "http://127.0.0.1:1/sd")]})
    )
    done = promtool("check", "config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr


def test_servicemonitor_keeps_the_jobs_namespace_label(docs: list[dict[str, Any]]) -> None:
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True


def test_rendered_rules_are_the_rule_file_and_pass_promtool(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    rule = one(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    rendered = tmp_path / "rules.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    done = promtool("check", "rules", str(rendered))
    assert done.returncode == 0 and "SUCCESS: 5 rules found" in done.stdout, done.stdout + done.stderr
    names = {r["alert"] for r in alert_rules()}
    assert names == {"DreamBoothCheckpointOverdue", "DreamBoothPreemptedWithoutProgress",
                     "DreamBoothWaitingForResources", "DreamBoothOperatorDown", "DreamBoothReconcileErrors"}  # fmt: skip


def test_every_alert_fires_on_its_series_and_not_on_the_near_miss(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    spec = one(docs, "PrometheusRule")["spec"]
    for group in spec["groups"]:
        for r in group["rules"]:
            r.pop("annotations", None)  # their templates are checked above; the unit tests compare labels
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec))
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    tests["rule_files"] = ["rules.yaml"]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"]}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert needs a promtool unit test"
    done = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_configmap_holds_the_generated_json(docs: list[dict[str, Any]]) -> None:
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert json.loads(cm["data"]["dashboard.json"]) == json.loads(DASHBOARD.read_text())
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "dashboard.py"), "--check"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(cm, version, strict=True)


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries(VARIABLES)
    assert len(queries) >= 15
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]}]}  # fmt: skip
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(tmp_path / "q.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    titles = {title for title, _ in queries}
    for wanted in ("Step", "ETA", "Loss", "Steps per second", "Checkpoint age", "Checkpoint stall and publish",
                   "Preemptions by cause (namespace)", "Time in WaitingForResources", "Attempts", "Jobs by phase",
                   "Reconcile latency", "API errors and reconcile errors"):  # fmt: skip
        assert wanted in titles


def _exposed_metrics() -> set[str]:
    """Every family the operator and the trainer expose, as a scrape names it (counters with _total)."""
    from prometheus_client.parser import text_string_to_metric_families

    from dreambooth_operator.metrics import Metrics
    from dreambooth_trainer.progress import Progress, _metric_families

    names = set()
    for family in text_string_to_metric_families(Metrics().render().decode()):
        if not family.name.endswith("_created"):
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    for family in _metric_families(Progress(4, enabled=False)):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_docs_list_exactly_the_metrics_exposed() -> None:
    exposed, documented = _exposed_metrics(), documented_metrics()
    assert not exposed - documented, f"exposed but not in docs/metrics.md: {sorted(exposed - documented)}"
    assert not documented - exposed, f"in docs/metrics.md but not exposed: {sorted(documented - exposed)}"


def test_rules_and_dashboard_use_only_documented_metrics() -> None:
    used = set().union(*(metric_names(r["expr"]) for r in alert_rules()))
    used |= set().union(*(metric_names(expr) for _, expr in dashboard_queries(VARIABLES)))
    assert used and not used - documented_metrics(), sorted(used - documented_metrics())


def test_networkpolicy_example_is_valid() -> None:
    objects = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    assert [o["kind"] for o in objects] == ["NetworkPolicy", "NetworkPolicy"]
    for obj in objects:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    # The admission webhook stays reachable by the apiserver (no `from`: it is not in the pod network).
    operator = objects[0]["spec"]
    assert {"ports": [{"port": Settings().webhook_port, "protocol": "TCP"}]} in operator["ingress"]
    trainer = objects[1]["spec"]
    assert trainer["podSelector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "dreambooth-operator"}
    assert {"port": 8080, "protocol": "TCP"} in trainer["ingress"][1]["ports"]


def _a_job() -> Any:
    from dreambooth_operator.spec import validate

    return validate({
        "apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob",
        "metadata": {"name": "dog", "namespace": "team-a", "uid": "u1", "generation": 1},
        "spec": {"method": "lora", "training": {
            "pretrainedModelNameOrPath": "s3://models/tiny/", "instanceDataDir": "s3://data/dog/",
            "instancePrompt": "a photo of sks dog", "outputDir": "s3://runs/dog/"}},
    })  # fmt: skip
