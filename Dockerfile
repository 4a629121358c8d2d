# syntax=docker/dockerfile:1
#
# Two images from one file (scripts/release.sh builds and pushes both):
#   docker build --target operator -t REGISTRY/operator:0.2.0 .                 # kopf, no torch
#   docker build --target trainer  -t REGISTRY/trainer:0.2.0 .                  # CUDA torch from PyPI
#   docker build --target trainer  --build-arg TORCH_VARIANT=cpu --build-context wheels=DIR \
#                -t REGISTRY/trainer:0.2.0-cpu .                                # CPU torch from DIR
#
# Layers go from "changes least" to "changes most": base + venv, then the pinned dependency locks
# (docker/requirements-*.txt), then torch, then the project's source last, so editing the code rebuilds only
# the final small layer. Every Python package is pinned by a lock; the project itself is installed with
# --no-index, so a lock that misses a dependency fails the build instead of pulling an unpinned one.

# The release's base: the official Python 3.11 image on Debian bookworm, pinned by the digest of its
# multi-architecture index (docs/install.md). Any Debian bookworm image with Python 3.11 and `python -m venv`
# works; the tests build from a bookworm root made with debootstrap, pinned by its own digest the same way.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---------------------------------------------------------------------------------------------------- wheels
# Wheels to install from instead of (or before) the index: empty by default. `--build-context wheels=DIR` with a
# folder made by `pip download` replaces it; with `--build-arg PIP_NO_INDEX=1` the build then reaches no index at
# all (the tests build this way: tests/images.py). TORCH_VARIANT=cpu takes its torch wheel from here.
FROM scratch AS wheels

# ---------------------------------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A venv keeps our packages apart from the distribution's Python (Debian's refuses pip: PEP 668) and pins the
# build tools used with --no-build-isolation below.
# pip reads PIP_NO_INDEX from the environment: "1" installs from the wheels context only.
ARG PIP_NO_INDEX=0
# The build tools are not compiled to bytecode: nothing runs them once the image is built.
RUN --mount=type=bind,from=wheels,target=/wheels \
    python -m venv /opt/venv \
 && pip install --no-cache-dir --no-compile --find-links /wheels "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1"
WORKDIR /src

# ------------------------------------------------------------------------------------------------ operator
FROM base AS operator
ARG PIP_NO_INDEX=0
COPY docker/requirements-operator.txt /tmp/requirements-operator.txt
# kubernetes >= 35 ships an asyncio client (kubernetes.aio: 68 MB, a third of the image) beside the sync one. The
# operator uses only the sync client (kube.py), kopf its own aiohttp session: the unused copy is left out.
RUN --mount=type=bind,from=wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels -r /tmp/requirements-operator.txt \
 && rm -rf /opt/venv/lib/python3.11/site-packages/kubernetes/aio
COPY pyproject.toml README.md LICENSE ./
COPY api/ api/
COPY cli/ cli/
COPY trainer_image/ trainer_image/
COPY operator/ operator/
# Not editable (the source folder goes away) and with no index: everything [operator] needs is in the lock.
# DL3013 reads ".[operator]" as an unpinned package; it is this project's own source, pinned by the COPY above.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --no-build-isolation ".[operator]" \
 && pip check \
 && rm -rf /src/* \
 && python -c "import dreambooth_operator, kopf, kubernetes.client, kubernetes.config" \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
# Numeric user, so runAsNonRoot can be verified by the kubelet without reading /etc/passwd.
# (Debian already has a group called "operator": ours gets its own name.)
RUN groupadd --gid 10001 dreambooth \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin dreambooth
USER 10001:10001
WORKDIR /tmp
# /healthz and /metrics (METRICS_PORT).
EXPOSE 8080
ENTRYPOINT ["python", "-m", "dreambooth_operator"]

# ------------------------------------------------------------------------------------------------- trainer
FROM base AS trainer
ARG PIP_NO_INDEX=0
# TORCH_VARIANT=cuda (the default): PyPI's Linux torch wheel, which carries the CUDA runtime (no CUDA base image
# needed). torch 2.13 from PyPI is built for CUDA 13.0: it needs an NVIDIA driver >= 580 and no longer runs on
# Volta (V100) or Pascal (P100) GPUs. For older drivers or GPUs pick a CUDA 12 build, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# TORCH_VARIANT=cpu: torch==TORCH_VERSION+cpu from the `wheels` build context (no CUDA, ~1.5 GB smaller), for
# CPU-only clusters and the tests; fetch it with
#   pip download --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu -d DIR
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Empty = no xformers (PyTorch's SDPA attention is the default and needs nothing). Otherwise the xformers
# release built for TORCH_VERSION, from the same index (CUDA variant only).
ARG XFORMERS_VERSION=""
# The largest layer (several GB for CUDA), first: it changes only with the build args above. The CPU wheel goes
# in without its dependencies: the lock below pins them.
RUN --mount=type=bind,from=wheels,target=/wheels \
    case "${TORCH_VARIANT}" in \
      cuda) pip install --no-cache-dir --find-links /wheels --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
            && if [ -n "${XFORMERS_VERSION}" ]; then \
                 pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "xformers==${XFORMERS_VERSION}"; \
               fi ;; \
      cpu) pip install --no-cache-dir --no-index --no-deps --find-links /wheels "torch==${TORCH_VERSION}+cpu" \
           || { echo "TORCH_VARIANT=cpu: no torch==${TORCH_VERSION}+cpu wheel in the 'wheels' build context;" \
                     "add --build-context wheels=DIR with that wheel in DIR (Dockerfile, trainer stage)" >&2; exit 1; } ;; \
      *) echo "TORCH_VARIANT=${TORCH_VARIANT}: use cuda or cpu" >&2; exit 1 ;; \
    esac
COPY docker/requirements-trainer.txt /tmp/requirements-trainer.txt
RUN --mount=type=bind,from=wheels,target=/wheels \
    pip install --no-cache-dir --find-links /wheels -r /tmp/requirements-trainer.txt
# 8-bit Adam (use8BitAdam), the main memory saver for 16 GB GPUs; empty = leave it out (and always out of the
# CPU variant: its optimizers are CUDA kernels). --no-deps: its requirements (torch, numpy, packaging) are
# already pinned above and must not be moved by it.
ARG BITSANDBYTES_VERSION=0.50.2
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "${BITSANDBYTES_VERSION}" ] && [ "${TORCH_VARIANT}" = cuda ]; then \
      pip install --no-cache-dir --no-deps --find-links /wheels "bitsandbytes==${BITSANDBYTES_VERSION}"; \
    fi
COPY pyproject.toml README.md LICENSE ./
COPY api/ api/
COPY cli/ cli/
COPY trainer_image/ trainer_image/
COPY operator/ operator/
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --no-build-isolation ".[trainer]" \
 && pip check \
 && rm -rf /src/*
# Pods run as UID 1000 (the operator's pod securityContext). Caches must be writable by it: the operator points
# HF_HOME/TORCH_HOME/DREAMBOOTH_CACHE at an emptyDir in its pods; these defaults serve `docker run`.
RUN groupadd --gid 1000 trainer \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/trainer --shell /bin/bash trainer \
 && mkdir -p /home/trainer/.cache/huggingface /home/trainer/.cache/torch /home/trainer/.cache/dreambooth /scratch \
 && chown -R 1000:1000 /home/trainer /scratch
ENV HOME=/home/trainer \
    XDG_CACHE_HOME=/home/trainer/.cache \
    HF_HOME=/home/trainer/.cache/huggingface \
    TORCH_HOME=/home/trainer/.cache/torch \
    DREAMBOOTH_CACHE=/home/trainer/.cache/dreambooth \
    DREAMBOOTH_SCRATCH=/scratch
USER 1000:1000
WORKDIR /home/trainer
# /progress and /metrics of rank 0 (PROGRESS_PORT), and the torchrun rendezvous.
EXPOSE 8080 29500
# PID 1 is the launcher: it runs torchrun, forwards SIGTERM and maps exit codes (0, 64, 70, 71, 75).
ENTRYPOINT ["python", "-m", "dreambooth_trainer.launch"]
