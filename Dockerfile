# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target operator -t dreambooth-operator:0.1.0 .     # kopf operator, no torch (~200 MB)
#   docker build --target trainer  -t dreambooth-trainer:0.1.0  .     # torch + CUDA runtime from PyPI wheels
#
# Layers go from "changes least" to "changes most": base + venv, then the pinned dependency locks
# (docker/requirements-*.txt), then torch, then the project's source last, so editing the code rebuilds only
# the final small layer. Every Python package is pinned by a lock; the project itself is installed with
# --no-index, so a lock that misses a dependency fails the build instead of pulling an unpinned one.

# The official image; any Python 3.11 image with `python -m venv` works (the packaging tests build the operator
# target from a Debian bookworm root made with debootstrap: docs/install.md).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

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
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1"
WORKDIR /src

# ------------------------------------------------------------------------------------------------ operator
FROM base AS operator
COPY docker/requirements-operator.txt /tmp/requirements-operator.txt
RUN pip install --no-cache-dir -r /tmp/requirements-operator.txt
COPY pyproject.toml README.md ./
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
 && python -c "import dreambooth_operator, kopf" \
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
# PyPI's Linux torch wheels carry the CUDA runtime (no CUDA base image needed). torch 2.13 from PyPI is built
# for CUDA 13: it needs an NVIDIA driver >= 580 and no longer runs on Volta (V100) or Pascal (P100) GPUs.
# For older drivers or GPUs pick a CUDA 12 build, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Empty = no xformers (PyTorch's SDPA attention is the default and needs nothing). Otherwise the xformers
# release built for TORCH_VERSION, from the same index.
ARG XFORMERS_VERSION=""
# The largest layer (several GB), first: it changes only with the build args above.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && if [ -n "${XFORMERS_VERSION}" ]; then \
      pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "xformers==${XFORMERS_VERSION}"; \
    fi
COPY docker/requirements-trainer.txt /tmp/requirements-trainer.txt
RUN pip install --no-cache-dir -r /tmp/requirements-trainer.txt
# 8-bit Adam (use8BitAdam), the main memory saver for 16 GB GPUs; empty = leave it out. --no-deps: its
# requirements (torch, numpy, packaging) are already pinned above and must not be moved by it.
ARG BITSANDBYTES_VERSION=0.50.2
RUN if [ -n "${BITSANDBYTES_VERSION}" ]; then \
      pip install --no-cache-dir --no-deps "bitsandbytes==${BITSANDBYTES_VERSION}"; \
    fi
COPY pyproject.toml README.md ./
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
