"""Test harness: a real Kubernetes v1.20 control plane built offline, plus a process kubelet.

See tests/cluster/README.md. Import as ``k8s_harness`` with ``tests/cluster`` on ``sys.path`` (pytest does that for
tests in ``tests/cluster``; ``tests/cluster/conftest.py`` does it for everyone else).
"""

from .cluster import Cluster, list_states
from .kubelet import NodeConfig
from .rest import ApiError, Kube
from .tools import bin_dir, cache_dir, ensure_tools, tool_path
from .util import wait_until

__all__ = [
    "ApiError",
    "Cluster",
    "Kube",
    "NodeConfig",
    "bin_dir",
    "cache_dir",
    "ensure_tools",
    "list_states",
    "tool_path",
    "wait_until",
]
