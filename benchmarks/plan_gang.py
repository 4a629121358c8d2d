"""What one reconcile of a large gang costs the operator (issue 17, item 5): the pure planner, no cluster.

    .venv/bin/python benchmarks/plan_gang.py [--nodes 1000]

Prints the time and peak Python memory of a plan() for a job of N nodes (i) with no pods (the attempt's creates),
(ii) with every pod but one (the missing one is built again), (iii) with every pod running. Before issue 17 every
reconcile built every pod of the gang; now only the pods it creates. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from datetime import UTC, datetime
from typing import Any

from dreambooth_operator.plan import PlanOptions, World, plan


def job(nodes: int) -> dict[str, Any]:
    training = {"pretrainedModelNameOrPath": "s3://m/", "instanceDataDir": "s3://d/", "instancePrompt": "a sks dog",
                "outputDir": "s3://o/", "maxTrainSteps": 20, "checkpointingSteps": 5, "resolution": 64}  # fmt: skip
    return {
        "apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob",
        "metadata": {"name": "big", "namespace": "ns", "uid": "uid-1", "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"method": "lora", "training": training, "resources": {"nodes": nodes, "gpusPerNode": 0, "image": "t"}},
    }  # fmt: skip


def measure(label: str, world: World, opts: PlanOptions) -> Any:
    tracemalloc.start()
    t0 = time.perf_counter()
    result = plan(world, opts)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    creates = sum(1 for a in result.actions if a.verb == "create" and (a.obj or {}).get("kind") == "Pod")
    print(f"{label:<34} {seconds * 1000:8.1f} ms  peak {peak / 1e6:7.1f} MB  pods built and created: {creates}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    n = parser.parse_args().nodes
    try:
        opts = PlanOptions(max_nodes=n)
    except TypeError:  # a release before the bound: nothing to raise
        opts = PlanOptions()
    now = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    first = measure(f"{n} nodes, no pods yet", World(job(n), [], now), opts)
    pods = [a.obj for a in first.actions if a.verb == "create" and (a.obj or {}).get("kind") == "Pod"]
    body = {**job(n), "status": first.status.model_dump(by_alias=True, exclude_none=True, mode="json")}
    # The operator died between its creates and the status write (act_first): the next reconcile completes the gang.
    unwritten = {**body, "status": {k: v for k, v in body["status"].items() if k != "gangCreated"}}
    measure(f"{n} nodes, one pod missing", World(unwritten, pods[:-1], now), opts)
    running = [{**p, "status": {"phase": "Running", "podIP": "10.0.0.1"}} for p in pods]
    measure(f"{n} nodes, all pods running", World(body, running, now), opts)


if __name__ == "__main__":
    main()
