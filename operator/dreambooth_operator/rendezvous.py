"""The one place that knows torchrun's rendezvous environment.

torchrun reads ``PET_<FLAG>`` for each of its flags, so the launcher passes them through untouched. Rendezvous
is static: pod index = node rank, pod 0's stable DNS name (hostname + headless Service) is the master address.
"""

from __future__ import annotations

MASTER_PORT = 29500
# Margin on top of schedulingTimeoutSeconds: the operator, not torchrun, decides when a gang waited too long.
RDZV_TIMEOUT_MARGIN_SECONDS = 60


def nproc_per_node(gpus_per_node: int) -> int:
    """One worker per GPU; a CPU-only pod (gpusPerNode 0, tests) runs one process."""
    return gpus_per_node if gpus_per_node > 0 else 1


def master_addr(hostname0: str, service: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    return f"{hostname0}.{service}.{namespace}.svc.{cluster_domain}"


def rendezvous_env(
    *,
    nodes: int,
    gpus_per_node: int,
    node_rank: int,
    hostname0: str,
    service: str,
    namespace: str,
    scheduling_timeout_seconds: int,
    cluster_domain: str = "cluster.local",
) -> list[dict[str, str]]:
    return [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc_per_node(gpus_per_node))},
        {"name": "PET_NODE_RANK", "value": str(node_rank)},
        {"name": "PET_MASTER_ADDR", "value": master_addr(hostname0, service, namespace, cluster_domain)},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "PET_RDZV_BACKEND", "value": "static"},
        # Restarts are the operator's job (a new attempt from the last checkpoint), never torchrun's in place.
        {"name": "PET_MAX_RESTARTS", "value": "0"},
        # Peers of a gang start as capacity appears: wait at least as long as the operator lets them wait.
        {
            "name": "DREAMBOOTH_RDZV_TIMEOUT_SECONDS",
            "value": str(scheduling_timeout_seconds + RDZV_TIMEOUT_MARGIN_SECONDS),
        },
    ]
