"""``python -m k8s_harness up|down|status`` (with tests/cluster on PYTHONPATH); up.sh/down.sh call this."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cluster import STATE_BASE, Cluster, list_states, prune_stale
from .kubelet import NodeConfig
from .tools import REPO_ROOT, bin_dir

CURRENT = STATE_BASE / "current"


def up(a: argparse.Namespace) -> int:
    crds = None if a.no_crds else (a.crds or REPO_ROOT / "crds")
    nodes = [NodeConfig(f"node-{i}", gpus=a.gpus, cpu=a.cpu, memory=a.memory) for i in range(a.nodes)]
    c = Cluster.start(crds=crds, nodes=nodes, detach=True)
    tmp = STATE_BASE / ".current.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(c.state_dir)
    tmp.replace(CURRENT)
    t = c.timings
    print(
        f"# cluster {c.id} up in {t['total']:.1f}s (apiserver {t.get('apiserver', 0):.1f}s, "
        f"controllers {t.get('controllers', 0):.1f}s, kubelet {t.get('kubelet', 0):.1f}s, "
        f"{int(t.get('crd_count', 0))} CRDs)",
        file=sys.stderr,
    )
    print(
        f"# state: {c.state_dir}  logs: {c.logs}  pod network gateway (host IP for pods): {c.host_ip}", file=sys.stderr
    )
    print(f"# stop with: tests/cluster/down.sh {c.state_dir}", file=sys.stderr)
    print(f"export PATH={bin_dir()}:$PATH")
    print(f"export KUBECONFIG={c.kubeconfig}")
    return 0


def down(a: argparse.Namespace) -> int:
    if a.all:
        dirs = list_states()
    elif a.state_dir:
        dirs = [Path(a.state_dir)]
    elif CURRENT.exists():
        dirs = [CURRENT.resolve()]
    else:
        print(f"no cluster to stop (nothing at {CURRENT}); use --all for every recorded cluster", file=sys.stderr)
        return 0
    for d in dirs:
        if not (d / "state.json").exists():
            print(f"{d}: no state.json, skipped", file=sys.stderr)
            continue
        c = Cluster.attach(d)
        c.stop()
        print(f"stopped cluster {c.id} ({d})", file=sys.stderr)
    if CURRENT.is_symlink() and not CURRENT.exists():
        CURRENT.unlink()
    return 0


def prune(_a: argparse.Namespace) -> int:
    for cid in prune_stale(min_age_seconds=0):
        print(f"removed dead cluster {cid}", file=sys.stderr)
    return 0


def status(_a: argparse.Namespace) -> int:
    for d in list_states():
        c = Cluster.attach(d)
        print(f"{c.id}\t{'running' if c.alive() else 'partly dead'}\t{c.kubeconfig}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="k8s_harness")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start a cluster + process kubelet; print export lines")
    u.add_argument("--crds", type=Path, help="CRD folder or file (default: the repo's crds/)")
    u.add_argument("--no-crds", action="store_true")
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per node")
    u.add_argument("--cpu", default="8")
    u.add_argument("--memory", default="32Gi")
    u.set_defaults(fn=up)
    d = sub.add_parser("down", help="stop the cluster started by up (or STATE_DIR, or --all)")
    d.add_argument("state_dir", nargs="?")
    d.add_argument("--all", action="store_true")
    d.set_defaults(fn=down)
    pr = sub.add_parser("prune", help="clean up clusters whose processes all died")
    pr.set_defaults(fn=prune)
    s = sub.add_parser("status", help="list recorded clusters")
    s.set_defaults(fn=status)
    a = p.parse_args(argv)
    return int(a.fn(a))


if __name__ == "__main__":
    sys.exit(main())
