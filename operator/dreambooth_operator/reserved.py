"""What the operator sets in every pod, and so what a job's podTemplate may not set: env, volumes, mount paths,
label and annotation keys.

One list for both sides: the builders (resources.py) fill these in, and spec.py refuses a job that sets them too,
naming the field. A name the builders start to set is refused from then on, with nothing else to update.
"""

from __future__ import annotations

from dreambooth_api.manifest import API_GROUP, Storage

CONFIG_DIR = "/etc/dreambooth"
SCRATCH_DIR = "/scratch"
CACHE_DIR = "/cache"
# The trainer image's home (Dockerfile, trainer stage). The root filesystem is read-only, so HOME and /tmp are
# emptyDirs: anything that writes a dotfile or a temp file (torchrun, matplotlib, triton) still can.
HOME_DIR = "/home/trainer"
TMP_DIR = "/tmp"
# Volume name -> mount path, in every trainer container.
VOLUMES = {
    "config": CONFIG_DIR,
    "dshm": "/dev/shm",
    "scratch": SCRATCH_DIR,
    "cache": CACHE_DIR,
    "tmp": TMP_DIR,
    "home": HOME_DIR,
}
GPU_RESOURCE = "nvidia.com/gpu"

# Names the operator may set, whatever the job says: a user value would be silently shadowed or shadow ours.
STORAGE_ENV = tuple(Storage(endpoint="x", region="x", path_style=True).env())
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
HUB_TOKEN_ENV = "HF_TOKEN"  # huggingface_hub reads it; spec.hub.tokenSecretRef sets it
ENV_OWNERS: dict[str, str] = {
    **{n: "spec.storage" for n in STORAGE_ENV},
    **{n: "spec.storage.credentialsSecret" for n in CREDENTIAL_ENV},
    **{n: "the operator's rendezvous settings" for n in (
        "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
        "PET_RDZV_BACKEND", "PET_MAX_RESTARTS", "DREAMBOOTH_RDZV_TIMEOUT_SECONDS")},
    **{n: "the operator" for n in (
        "DREAMBOOTH_JOB_UID", "DREAMBOOTH_JOB_NAME", "DREAMBOOTH_NAMESPACE", "DREAMBOOTH_ATTEMPT", "DREAMBOOTH_GRACE_SECONDS",
        "DREAMBOOTH_MEMORY_SAVERS", "TERMINATION_MESSAGE_PATH", "PROGRESS_PORT", "POD_IP", "HF_HOME", "TORCH_HOME",
        "DREAMBOOTH_CACHE", "DREAMBOOTH_SCRATCH", "HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
        "CUDA_CACHE_PATH")},
    "OMP_NUM_THREADS": "spec.resources.requests.cpu (split among the pod's workers)",
}  # fmt: skip

# Pod metadata the operator sets. Its own prefix is reserved whole: the operator finds its pods, attempts and
# gangs by these labels, so a user value would hide a pod from it or adopt a stranger's.
RESERVED_PREFIX = f"{API_GROUP}/"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP = "kueue.x-k8s.io/pod-group-name"
KUEUE_TOTAL = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_RETRIABLE = "kueue.x-k8s.io/retriable-in-group"
METADATA_OWNERS: dict[str, str] = {
    LABEL_MANAGED_BY: "the operator (it marks the pods it manages)",
    KUEUE_QUEUE: "spec.runPolicy.queueName (set the queue there)",
    KUEUE_GROUP: "the operator (one Kueue pod group per attempt)",
    KUEUE_TOTAL: "the operator (the gang size, spec.resources.nodes)",
    KUEUE_RETRIABLE: "the operator (a gang is retried as a whole)",
}


def metadata_owner(key: str) -> str | None:
    """Who sets a pod label or annotation key, or None when a job may set it."""
    if key.startswith(RESERVED_PREFIX):
        return f"the operator (every {RESERVED_PREFIX}* key is its own)"
    return METADATA_OWNERS.get(key)
