"""How the operator scales: N DreamBoothJobs whose single pod just sleeps (podTemplate.command override).

    sudo .venv/bin/python benchmarks/operator_scale.py [--jobs 100] [--attach STATE_DIR] [--output result.json]

Starts the test cluster (v1.20 control plane + process kubelet, tests/cluster) unless --attach names a running
one (tests/cluster/up.sh), runs `python -m dreambooth_operator` on one namespace, creates the jobs as fast as
the API takes them and reports:

- seconds from the first create until every pod exists, until every pod runs, until every job reads Running;
  and per job, seconds from its create returning to its pod's first watch event (p50/p95/max);
- the operator's peak RSS and CPU seconds (process and children, sampled with psutil);
- apiserver requests the reconciler made per job (its own counter, /metrics) up to "all Running", and per job
  per minute in the steady state that follows (resync + progress polls); status writes per job.

Target (issue): all pods within 10 s; status written only on change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            m = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.e+-]+)$", line)
            if m:
                total += float(m.group(2))
    return total


class Sampler(threading.Thread):
    """Peak RSS (process + children) of the operator, sampled every 100 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in procs))
            except Exception:  # noqa: BLE001 - a child that just exited
                pass
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--sleep", type=int, default=600, help="seconds each pod sleeps (longer than the run)")
    parser.add_argument("--steady-seconds", type=float, default=60, help="steady-state window after all Running")
    parser.add_argument("--attach", help="state folder of a cluster started by tests/cluster/up.sh")
    parser.add_argument("--output", help="write the result as JSON here too")
    args = parser.parse_args(argv)

    from k8s_harness import Cluster, wait_until
    from operator_support import Jobs, OperatorProcess, sleep_job

    cluster = Cluster.attach(args.attach) if args.attach else Cluster.start(crds=REPO / "crds")
    api = cluster.kube_api
    ns = cluster.ensure_namespace()
    # The operator's own defaults (resync, backoff): what a user runs.
    operator = OperatorProcess(cluster, ns, Path(tempfile.mkdtemp(prefix="operator-scale-")), test_timings=False,
                               LOG_LEVEL="WARNING")  # fmt: skip
    jobs = Jobs(cluster, ns, operator)
    result: dict[str, Any] = {"jobs": args.jobs}
    try:
        operator.start()
        assert operator.proc is not None
        sampler = Sampler(operator.proc.pid)
        sampler.start()
        cpu0 = sampler.cpu_seconds()
        pods_path = f"/api/v1/namespaces/{ns}/pods"
        selector = "app.kubernetes.io/managed-by=dreambooth-operator"
        created_at: dict[str, float] = {}
        seen_at: dict[str, float] = {}  # job -> when its pod was first seen
        running_at: dict[str, float] = {}  # job -> when its pod was first seen Running
        # Pods are seen on a watch, not by polling: a LIST of every pod each 0.1 s would load the apiserver the
        # operator is measured against, and time each pod to the event rather than to the next poll.
        rv = api.get(pods_path, labelSelector=selector)["metadata"]["resourceVersion"]
        stop = threading.Event()

        def watch_pods() -> None:
            while not stop.is_set():
                for ev in api.watch(pods_path, rv, timeout_seconds=60, labelSelector=selector):
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        now, pod = time.monotonic(), ev["object"]
                        job_name = pod["metadata"]["labels"]["dreambooth.dev/job-name"]
                        seen_at.setdefault(job_name, now)
                        if (pod.get("status") or {}).get("phase") == "Running":
                            running_at.setdefault(job_name, now)
                    if stop.is_set():
                        return

        threading.Thread(target=watch_pods, daemon=True).start()

        def create(i: int) -> None:
            name = f"bench-{i:03d}"
            jobs.create(sleep_job(name, args.sleep))
            created_at[name] = time.monotonic()

        t0 = time.monotonic()
        # Users (or a CI system) submit concurrently; the apiserver here takes ~10-200 ms a POST.
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(args.jobs)))
        t_created = time.monotonic()
        result["create_seconds"] = round(t_created - t0, 2)

        wait_until(lambda: len(seen_at) >= args.jobs, 600, 0.05, "all pods exist")
        last_seen = max(seen_at.values())
        result["all_pods_exist_seconds"] = round(last_seen - t0, 2)
        result["all_pods_exist_after_last_create_seconds"] = round(last_seen - t_created, 2)
        lat = sorted(seen_at[n] - created_at[n] for n in created_at if n in seen_at)
        result["job_to_pod_seconds_p50"] = round(lat[len(lat) // 2], 2)
        result["job_to_pod_seconds_p95"] = round(lat[int(len(lat) * 0.95) - 1], 2)
        result["job_to_pod_seconds_max"] = round(lat[-1], 2)
        wait_until(lambda: len(running_at) >= args.jobs, 600, 0.05, "all pods running")
        result["all_pods_running_seconds"] = round(max(running_at.values()) - t0, 2)
        stop.set()

        def all_jobs_running() -> bool:
            items = api.get(jobs.base)["items"]
            return sum(1 for j in items if (j.get("status") or {}).get("phase") == "Running") >= args.jobs

        wait_until(all_jobs_running, 600, 0.5, "all jobs Running")
        result["all_jobs_running_seconds"] = round(time.monotonic() - t0, 2)
        text = operator.metrics()
        reqs, writes = (
            metric_sum(text, "dreambooth_operator_api_requests_total"),
            metric_sum(text, "dreambooth_operator_status_writes_total"),
        )
        result["api_requests_per_job_to_running"] = round(reqs / args.jobs, 1)
        for verb in ("get", "list", "create", "patch", "delete"):
            n = metric_sum(text, f'dreambooth_operator_api_requests_total{{verb="{verb}"}}')
            result[f"api_{verb}_per_job_to_running"] = round(n / args.jobs, 2)
        result["status_writes_per_job_to_running"] = round(writes / args.jobs, 1)
        time.sleep(args.steady_seconds)
        text = operator.metrics()
        steady_reqs = metric_sum(text, "dreambooth_operator_api_requests_total") - reqs
        steady_writes = metric_sum(text, "dreambooth_operator_status_writes_total") - writes
        minutes = args.steady_seconds / 60
        result["steady_api_requests_per_job_per_minute"] = round(steady_reqs / args.jobs / minutes, 1)
        result["steady_status_writes_per_job_per_minute"] = round(steady_writes / args.jobs / minutes, 2)
        result["reconcile_seconds_mean"] = round(
            metric_sum(text, "dreambooth_operator_reconcile_seconds_sum")
            / max(1.0, metric_sum(text, "dreambooth_operator_reconcile_seconds_count")), 4)  # fmt: skip
        for verb in ("get", "list", "create", "patch"):
            n = metric_sum(text, f'dreambooth_operator_api_request_seconds_count{{verb="{verb}"}}')
            total = metric_sum(text, f'dreambooth_operator_api_request_seconds_sum{{verb="{verb}"}}')
            result[f"api_{verb}_seconds_mean"] = round(total / n, 4) if n else None
        result["operator_cpu_seconds"] = round(sampler.cpu_seconds() - cpu0, 1)
        result["operator_peak_rss_mib"] = round(sampler.peak_rss / 2**20, 1)
        sampler.stop.set()
        result["target_all_pods_within_10s"] = result["all_pods_exist_seconds"] <= 10
    finally:
        operator.stop()
        with contextlib.suppress(Exception):  # best-effort cleanup
            api.delete(f"/api/v1/namespaces/{ns}")
        if not args.attach:
            cluster.stop()
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
