"""Pytest fixtures of the cluster tier (imported by tests/cluster/conftest.py; other folders may import them too).

``cluster`` (session): a started ``k8s_harness.Cluster`` with the repo's ``crds/`` installed (before the
controller-manager starts), two Nodes ``node-0``/``node-1`` (8 CPU, 32Gi, 8 ``nvidia.com/gpu`` each) run by the
process kubelet. Useful members: ``kubeconfig`` (admin), ``kube_api`` (dict REST client), ``api_client()``
(official client), ``kubectl(...)``, ``env()`` (KUBECONFIG + our kubectl/helm first on PATH),
``as_service_account(ns, name)`` → kubeconfig path, ``apply(...)``, ``wait_pod_phase(...)``, ``pod_info(...)``,
``evict``/``preempt``/``node_shutdown``/``node_lost``/``node_recover``/``set_node_capacity``, ``host_ip``,
``expose_host_port(port)``.

``namespace`` (function): a fresh namespace, deleted afterwards.

Environment:
  DREAMBOOTH_K8S_CRDS       CRD folder/file to install (default: <repo>/crds; "none" to skip)
  DREAMBOOTH_K8S_ATTACH     state folder of a running cluster (from up.sh) to use instead of starting one
  DREAMBOOTH_K8S_KEEP_STATE 1 = keep the state folder (logs, pod folders) after the session
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import tools
from .cluster import Cluster
from .rest import ApiError

REPO = tools.REPO_ROOT
TIMINGS: dict[str, str] = {}


def _crds() -> Path | None:
    v = os.environ.get("DREAMBOOTH_K8S_CRDS")
    if v is None:
        return REPO / "crds"
    if v.lower() in ("", "none", "0"):
        return None
    return Path(v)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the cluster tier needs root (network namespaces, cgroups, mounts)")
    attach = os.environ.get("DREAMBOOTH_K8S_ATTACH")
    if attach:
        yield Cluster.attach(attach)
        return
    t = time.monotonic()
    built = tools.control_plane_ready()
    tools.ensure_control_plane()
    if not built:
        TIMINGS["first build (this session)"] = f"{time.monotonic() - t:.0f}s"
    c = Cluster.start(crds=_crds())
    tm = c.timings
    TIMINGS["cluster start-up from cache"] = (
        f"{tm['total']:.1f}s (apiserver ready {tm.get('apiserver', 0):.1f}s, CRDs {tm.get('crds', 0):.1f}s, "
        f"controllers {tm.get('controllers', 0):.1f}s, kubelet+nodes {tm.get('kubelet', 0):.1f}s)"
    )
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    ns = cluster.ensure_namespace()
    yield ns
    with contextlib.suppress(ApiError):
        cluster.kube_api.delete(f"/api/v1/namespaces/{ns}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Quote the numbers the issue asks for: cluster start-up time and the cost of the first build."""
    complete = tools.bin_dir() / ".complete"
    if not TIMINGS and not complete.exists():
        return
    terminalreporter.section("kubernetes test cluster")
    for k, v in TIMINGS.items():
        terminalreporter.write_line(f"{k}: {v}")
    if complete.exists():
        terminalreporter.write_line(f"cached control plane: {complete.read_text().strip()} (first build cost)")
