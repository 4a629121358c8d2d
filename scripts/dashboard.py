#!/usr/bin/env python3
"""Write charts/dreambooth-operator/files/dashboard.json, the Grafana dashboard the chart ships.

    python scripts/dashboard.py           # rewrite the JSON
    python scripts/dashboard.py --check   # exit 1 when the JSON is not up to date (the packaging test)

Panels are listed here as (title, unit, queries): the tests run every query against a real Prometheus that
scraped a real job (tests/cluster/test_monitoring.py), with the dashboard variables filled in. Grafana itself
is not installed in the tests: how it renders the JSON is unverified.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "charts" / "dreambooth-operator" / "files" / "dashboard.json"
UID = "dreambooth-jobs"
JOB = 'namespace="$namespace", dreambooth_job="$job"'

# (title, unit, [(legend, PromQL)]), in rows of panels.
PER_JOB: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Step", "none", [
        ("step", f"max(dreambooth_step{{{JOB}}})"),
        ("max steps", f"max(dreambooth_max_steps{{{JOB}}})"),
    ]),
    ("ETA", "s", [("eta", f"max(dreambooth_eta_seconds{{{JOB}}})")]),
    ("Loss", "none", [("loss", f"max(dreambooth_loss{{{JOB}}})")]),
    ("Steps per second", "none", [("steps/s", f"max(dreambooth_steps_per_second{{{JOB}}})")]),
    ("Checkpoint age", "s", [
        # Before a first checkpoint: since the start of training (what the alert measures too).
        ("age", f"time() - max(dreambooth_last_checkpoint_timestamp_seconds{{{JOB}}}"
                f" or dreambooth_training_started_timestamp_seconds{{{JOB}}})"),
        ("3 intervals (alert)", f"3 * max(dreambooth_checkpoint_interval_steps{{{JOB}}}"
                                f" / dreambooth_steps_per_second{{{JOB}}})"),
    ]),
    ("Checkpoint stall and publish", "s", [
        ("mean stall", f"max(dreambooth_checkpoint_stall_seconds_sum{{{JOB}}}"
                       f" / dreambooth_checkpoint_stall_seconds_count{{{JOB}}})"),
        ("last publish", f"max(dreambooth_checkpoint_last_publish_seconds{{{JOB}}})"),
    ]),
    ("Preemptions by cause (namespace)", "none", [
        ("{{reason}}", 'sum by (reason) (dreambooth_operator_preemptions_total{namespace="$namespace"})'),
        ("this job", f"max(dreambooth_operator_job_preemptions{{{JOB}}})"),
    ]),
    ("Time in WaitingForResources", "s", [
        # The gauge exists only while the job waits: 0 otherwise, for this job.
        ("waiting", f"(time() - max(dreambooth_operator_job_waiting_since_timestamp_seconds{{{JOB}}}))"
                    f" or (0 * max(dreambooth_operator_job_attempt{{{JOB}}}))"),
    ]),
    ("Attempts", "none", [
        ("attempt", f"max(dreambooth_operator_job_attempt{{{JOB}}})"),
        ("preemptions without progress", f"max(dreambooth_operator_job_preemptions_without_progress{{{JOB}}})"),
    ]),
]  # fmt: skip
CLUSTER: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Jobs by phase", "none", [("{{phase}}", "sum by (phase) (dreambooth_operator_jobs)")]),
    ("Reconcile latency", "s", [
        ("p50", "histogram_quantile(0.5, sum by (le) (rate(dreambooth_operator_reconcile_seconds_bucket"
                "[$__rate_interval])))"),
        ("p99", "histogram_quantile(0.99, sum by (le) (rate(dreambooth_operator_reconcile_seconds_bucket"
                "[$__rate_interval])))"),
    ]),
    ("API errors and reconcile errors", "reqps", [
        # Counters without a series until the first error: 0 until then.
        ("{{verb}} {{code}}", "sum by (verb, code) (rate(dreambooth_operator_api_errors_total[$__rate_interval]))"
                              " or vector(0)"),
        ("reconcile errors {{namespace}}",
         "sum by (namespace) (rate(dreambooth_operator_reconcile_errors_total[$__rate_interval])) or vector(0)"),
        ("API requests", "sum(rate(dreambooth_operator_api_requests_total[$__rate_interval]))"),
    ]),
]  # fmt: skip


def queries() -> list[str]:
    return [expr for _, _, targets in PER_JOB + CLUSTER for _, expr in targets]


def _panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, (legend, expr) in enumerate(targets)
        ],  # fmt: skip
    }


def _row(pid: int, title: str, y: int) -> dict[str, Any]:
    return {"id": pid, "type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for title, rows in (("Job $namespace/$job", PER_JOB), ("Cluster", CLUSTER)):
        panels.append(_row(len(panels) + 1, title, y))
        y += 1
        for i, (ptitle, unit, targets) in enumerate(rows):
            panels.append(_panel(len(panels) + 1, ptitle, unit, targets, 8 * (i % 3), y + 8 * (i // 3)))
        y += 8 * ((len(rows) + 2) // 3)

    def var(name: str, label: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query", "query": {"query": query, "refId": name},
                "definition": query, "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "refresh": 2, "sort": 1, "includeAll": False, "multi": False}  # fmt: skip

    return {
        "uid": UID,
        "title": "DreamBooth jobs",
        "description": "dreambooth-operator: per-job training progress and checkpoints, and the operator. "
        "Metrics: docs/metrics.md.",
        "tags": ["dreambooth"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                # Jobs come from the operator's gauges: a job waiting for resources has no trainer series yet.
                var("namespace", "Namespace", "label_values(dreambooth_operator_job_attempt, namespace)"),
                var(
                    "job",
                    "Job",
                    'label_values(dreambooth_operator_job_attempt{namespace="$namespace"}, dreambooth_job)',
                ),
            ]
        },  # fmt: skip
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the JSON is not up to date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is not up to date: run python scripts/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
