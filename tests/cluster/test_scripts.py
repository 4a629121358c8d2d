"""up.sh / down.sh work by hand: the cluster outlives the script, kubectl and helm talk to it, down stops it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from k8s_harness import tools
from k8s_harness.util import pid_is

pytestmark = pytest.mark.cluster

HERE = Path(__file__).resolve().parent


def test_up_prints_kubeconfig_last_and_down_stops_everything() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    up = subprocess.run(
        [str(HERE / "up.sh"), "--nodes", "1", "--gpus", "2"], capture_output=True, text=True, timeout=300
    )
    assert up.returncode == 0, up.stderr
    last = up.stdout.strip().splitlines()[-1]
    assert last.startswith("export KUBECONFIG=")
    kubeconfig = last.split("=", 1)[1]
    state_dir = Path(kubeconfig).parent
    import json

    procs = json.loads((state_dir / "state.json").read_text())["procs"]
    try:
        # The processes outlived up.sh.
        assert all(pid_is(p["pid"], p["start"]) for p in procs.values())
        env = {**os.environ, "KUBECONFIG": kubeconfig, "PATH": f"{tools.bin_dir()}:{os.environ['PATH']}"}
        nodes = subprocess.run(
            ["kubectl", "get", "nodes", "-o", "name"], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        assert nodes == ["node/node-0"]
        gpus = subprocess.run(
            ["kubectl", "get", "node", "node-0", "-o", "jsonpath={.status.capacity.nvidia\\.com/gpu}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert gpus == "2"
        assert subprocess.run(["helm", "list", "-A"], env=env, capture_output=True, text=True).returncode == 0
    finally:
        down = subprocess.run([str(HERE / "down.sh"), str(state_dir)], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not any(pid_is(p["pid"], p["start"]) for p in procs.values())
    assert not state_dir.exists()
