"""Both images built from the Dockerfile with Debian's buildah (no daemon) and run with runc as a kubelet would.

The operator target, and the trainer target's CPU variant (``TORCH_VARIANT=cpu``, the torch wheel from this
machine's pip through the wheelhouse build context), from the debootstrapped bookworm base pinned by digest:
tests/images.py says how (and holds the helpers the cluster tier shares). Cached in
``~/.cache/dreambooth-operator/buildah``: cold ~7 min here (debootstrap ~2 min, wheelhouse ~1 min from the pip
cache, trainer layers ~4 min), warm ~30 s.

The CUDA variant (PyPI's CUDA torch: ~4 GB of downloads, a 5.6 GB image, ~15 GB of disk at the peak of its
build, 6 min cold here; built in storage of its own) is the opt-in
``cuda_image`` tier: ``DREAMBOOTH_CUDA_IMAGE=1 pytest -m cuda_image tests/packaging`` (scripts/test.sh:
TIERS=cuda-image).

Needs root and ``apt-get install buildah debootstrap runc``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import images  # noqa: E402
from images import (  # noqa: E402, F401 - re-exported: the cluster tier imports them from here
    BASE_IMAGE,
    BASE_PACKAGES,
    DEBIAN_MIRROR,
    HOST_CA_BUNDLE,
    Buildah,
    cache_dir,
    locked,
    make_base_image,
)

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

IMAGE = images.VARIANTS["operator"].tag
TRAINER_CPU = images.VARIANTS["trainer-cpu"].tag
REPO = images.REPO
DOG = REPO / "examples" / "data" / "dog"
# As the trainer pods run: the operator's runAsUser, the image's root filesystem read-only, caches on tmpfs.
TRAINER_USER = "1000:1000"
TRAINER_TMPFS = ("/tmp", "/home/trainer/.cache", "/scratch")
OFFLINE = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def buildah() -> Buildah:
    return images.buildah_or_skip()


@pytest.fixture(scope="module")
def operator_image(buildah: Buildah) -> str:
    return images.build(buildah, "operator")


@pytest.fixture(scope="module")
def trainer_cpu_image(buildah: Buildah) -> str:
    return images.build(buildah, "trainer-cpu")


def run_in(b: Buildah, image: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    """`cmd` in a throwaway container of `image` (buildah run: root, writable, the image's environment)."""
    ctr = b("from", "--pull=never", image).stdout.strip()
    try:
        return b("run", "--isolation", "chroot", ctr, "--", *cmd, check=False, timeout=120)
    finally:
        b("rm", ctr, check=False)


def test_operator_image_runs_help(buildah: Buildah, operator_image: str) -> None:
    proc = images.run_container(buildah, operator_image, ["--help"], read_only=True, tmpfs=["/tmp"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage: dreambooth operator" in proc.stdout and "--metrics-port" in proc.stdout


def test_operator_image_is_non_root_without_torch(buildah: Buildah, operator_image: str) -> None:
    config = buildah.config(operator_image)
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["python", "-m", "dreambooth_operator"]
    proc = images.run_container(
        buildah, operator_image, ["-c", "import os, importlib.util as u; import kopf, kubernetes.client, "
                                  "dreambooth_operator.handlers; print(os.getuid(), u.find_spec('torch') is None)"],
        entrypoint=["python"], read_only=True, tmpfs=["/tmp"],
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.split() == ["10001", "True"], proc.stdout + proc.stderr


def test_trainer_cpu_image_config(buildah: Buildah, trainer_cpu_image: str) -> None:
    """What the operator's pods rely on: user 1000 (runAsUser), the launcher as ENTRYPOINT, caches under HOME."""
    config = buildah.config(trainer_cpu_image)
    assert config["User"] == TRAINER_USER
    assert config["Entrypoint"] == ["python", "-m", "dreambooth_trainer.launch"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HF_HOME"].startswith("/home/trainer/.cache/") and env["DREAMBOOTH_SCRATCH"] == "/scratch"


def test_trainer_cpu_image_runs_help_read_only_as_1000(buildah: Buildah, trainer_cpu_image: str) -> None:
    proc = images.run_container(
        buildah, trainer_cpu_image, ["--help"], entrypoint=["dreambooth"],
        user=TRAINER_USER, read_only=True, tmpfs=TRAINER_TMPFS, env=OFFLINE,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train-lora" in proc.stdout and "tiny-model" in proc.stdout
    versions = images.run_container(
        buildah, trainer_cpu_image, ["-c", "import os, torch, diffusers, peft, accelerate, importlib.util as u; "
                                     "print(os.getuid(), torch.__version__, torch.cuda.is_available(), "
                                     "u.find_spec('bitsandbytes') is None)"],
        entrypoint=["python"], user=TRAINER_USER, read_only=True, tmpfs=TRAINER_TMPFS, env=OFFLINE,
    )  # fmt: skip
    assert versions.returncode == 0, versions.stderr
    assert versions.stdout.split() == ["1000", "2.13.0+cpu", "False", "True"]


def _operator_pod_layout() -> tuple[tuple[str, ...], dict[str, str]]:
    """Where the operator's trainer pod may write (its emptyDirs; /dev/shm aside, runc makes one) and the env that
    points there, read from the operator's own pod builder: the image is run as the operator will run it."""
    from dreambooth_operator.resources import build_pod
    from dreambooth_operator.spec import validate

    training = {"pretrainedModelNameOrPath": "s3://m/", "instanceDataDir": "s3://d/", "instancePrompt": "p",
                "outputDir": "s3://o/"}  # fmt: skip
    body = {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob",
            "metadata": {"name": "j", "namespace": "n", "uid": "u"},
            "spec": {"method": "lora", "training": training, "resources": {"gpusPerNode": 0}}}  # fmt: skip
    pod = build_pod(validate(body), 1, 0)["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    tmpfs = tuple(
        m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty and m["mountPath"] != "/dev/shm"
    )
    paths = ("HOME", "HF_HOME", "TORCH_HOME", "DREAMBOOTH_CACHE", "DREAMBOOTH_SCRATCH", "TRITON_CACHE_DIR",
             "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH")  # fmt: skip
    return tmpfs, {e["name"]: e["value"] for e in container["env"] if e["name"] in paths}


def test_trainer_cpu_image_trains_two_steps_read_only(buildah: Buildah, trainer_cpu_image: str, tmp_path: Path) -> None:
    """A 2-step LoRA run on the tiny model inside the image, with the operator pod's read-only root, emptyDirs and
    env: the model is made in the cache emptyDir, the instance images come read-only from the host and the
    weights land in a writable bind mount, as an S3-less pod would."""
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)  # the container's UID 1000 writes it
    pod_tmpfs, pod_env = _operator_pod_layout()
    assert {"/tmp", "/home/trainer", "/cache", "/scratch"} <= set(pod_tmpfs)
    proc = images.run_container(
        buildah, trainer_cpu_image,
        ["train-lora", "--pretrained_model_name_or_path", "tiny://", "--instance_data_dir", "/data/dog",
         "--instance_prompt", "a photo of sks dog", "--output_dir", "/out/run", "--resolution", "32",
         "--train_batch_size", "1", "--max_train_steps", "2", "--checkpointing_steps", "100", "--seed", "7"],
        entrypoint=["dreambooth"], user=TRAINER_USER, read_only=True, tmpfs=pod_tmpfs,
        env={**OFFLINE, **pod_env, "DREAMBOOTH_RESULT_FILE": "/out/result.json"},
        binds=[(str(DOG), "/data/dog", True), (str(out), "/out", False)], timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    weights = out / "run" / "pytorch_lora_weights.safetensors"
    assert weights.stat().st_size > 0, sorted(p.name for p in (out / "run").iterdir())
    assert weights.stat().st_uid == 1000
    result = json.loads((out / "result.json").read_text())
    assert (result["exitCode"], result["step"]) == (0, 2), result


def test_read_only_root_is_enforced(buildah: Buildah, trainer_cpu_image: str) -> None:
    """The harness really mounts the image read-only: a write outside the tmpfs folders fails."""
    proc = images.run_container(
        buildah, trainer_cpu_image, ["-c", "open('/home/trainer/x', 'w')"], entrypoint=["python"],
        user=TRAINER_USER, read_only=True, tmpfs=TRAINER_TMPFS,
    )  # fmt: skip
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr, proc.stderr


@pytest.mark.cuda_image
def test_trainer_cuda_image_imports() -> None:
    """Opt-in (``DREAMBOOTH_CUDA_IMAGE=1``): PyPI's CUDA torch and bitsandbytes; ~4 GB of downloads."""
    if os.environ.get("DREAMBOOTH_CUDA_IMAGE") != "1":
        pytest.skip("opt-in (~4 GB download, ~15 GB disk): DREAMBOOTH_CUDA_IMAGE=1 or scripts/test.sh TIERS=cuda-image")
    images.buildah_or_skip()
    if shutil.disk_usage(images.cache_dir()).free < 15e9:
        pytest.skip("the CUDA trainer build needs ~15 GB free in the buildah cache")
    buildah = images.cuda_buildah()
    image = images.build(buildah, "trainer-cuda", offline=False)
    proc = images.run_container(
        buildah, image, ["-c", "import torch, diffusers, peft, bitsandbytes; print(torch.__version__, torch.version.cuda)"],
        entrypoint=["python"], user=TRAINER_USER, read_only=True, tmpfs=TRAINER_TMPFS, env=OFFLINE,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    torch_version, cuda = proc.stdout.split()
    # PyPI's Linux wheel, CUDA 13.0: what docs/install.md's driver requirement (>= 580) is about.
    assert torch_version.split("+")[0] == "2.13.0" and cuda.startswith("13."), proc.stdout
    helped = images.run_container(
        buildah, image, ["--help"], entrypoint=["dreambooth"], user=TRAINER_USER, read_only=True, tmpfs=TRAINER_TMPFS
    )
    assert helped.returncode == 0, helped.stderr
