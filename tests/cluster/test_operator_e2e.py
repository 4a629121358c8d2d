"""The operator with the real trainer: 2 pods x 1 process (gloo) on the tiny model, data and output on SeaweedFS.
The pods run the released CPU trainer image, pulled from the tests' registry (its /opt/venv, UID 1000, ENTRYPOINT
and a memory limit enforced), not this machine's files.

A pod deleted mid-run (and a node lost) must cost no exactness: the resumed gang ends with weights bit-identical
to an uninterrupted run, counted as one preemption and no restart.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path
from typing import Any

import pytest
from k8s_harness import Cluster
from operator_support import Jobs, OperatorProcess, dreambooth_job, tiny_family_model, tiny_training

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("dreambooth_trainer.launch") is None,
        reason="the launcher (dreambooth_trainer.launch, the pods' PID 1) is not in this tree yet",
    ),
]
REPO = Path(__file__).resolve().parents[2]
STEPS = 8
WEIGHTS = "pytorch_lora_weights.safetensors"


def real_job(
    name: str,
    storage: dict[str, Any],
    image: str,
    *,
    step_delay: float = 0.0,
    nodes: int = 2,
    method: str = "lora",
    training: dict[str, Any] | None = None,
    env_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    bucket = storage["bucket"]
    env = {"MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    if step_delay:
        # The trainer's test knob: slow steps so a preemption lands mid-run (never changes the math).
        env["DREAMBOOTH_TEST_STEP_DELAY_SECONDS"] = str(step_delay)
    if training is None:
        training = tiny_training(name, bucket, STEPS, validationPrompt="a photo of sks dog", validationEpochs=1,
                                 numValidationImages=1)  # fmt: skip
    return dreambooth_job(
        name,
        training,
        method=method,
        nodes=nodes,
        requests_={"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"},
        # Enforced (cgroup v1): torch, diffusers and the tiny model take ~1 GiB per pod; an undersized limit is a
        # real OOMKilled here.
        resources={"image": image, "limits": {"memory": "3Gi"}},
        pod_template={"env": [{"name": k, "value": v} for k, v in env.items()]},
        run_policy={
            "terminationGracePeriodSeconds": 60,
            "backoffLimit": 0,
            "maxPreemptions": 3,
            "schedulingTimeoutSeconds": 300,
            "progressDeadlineSeconds": 600,
        },  # fmt: skip
        storage=storage["spec"],
    )


def final_weights(storage: dict[str, Any], name: str, scratch: Path) -> dict[str, Any]:
    from trainer_utils import weights  # tests/ is on sys.path (tests/conftest.py)

    scratch.mkdir(parents=True, exist_ok=True)
    storage["client"].download_file(storage["bucket"], f"runs/{name}/{WEIGHTS}", str(scratch / WEIGHTS))
    return weights(scratch, "lora")


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    from trainer_utils import assert_identical

    assert_identical(a, b)


_REFERENCE: dict[str, Any] = {}


def reference_weights(jobs: Jobs, storage: dict[str, Any], image: str, scratch: Path) -> dict[str, Any]:
    """The final weights of an uninterrupted run of real_job, trained once per test session (the math does not
    depend on the job's name, namespace or bucket, so every test compares against the same run)."""
    if "weights" not in _REFERENCE:
        jobs.create(real_job("base", storage, image))
        jobs.wait_phase("base", "Succeeded", 600)
        _REFERENCE["weights"] = final_weights(storage, "base", scratch)
    return _REFERENCE["weights"]


def latest_checkpoint(storage: dict[str, Any], name: str) -> str:
    """What the next attempt resumes from: the checkpoint LATEST names in the job's output prefix."""
    obj = storage["client"].get_object(Bucket=storage["bucket"], Key=f"runs/{name}/LATEST")
    return obj["Body"].read().decode().strip()


def test_real_trainer_happy_path_fills_every_status_field(
    jobs: Jobs, storage: dict[str, Any], tmp_path: Path, trainer_image: str
) -> None:
    jobs.create(real_job("dog", storage, trainer_image, step_delay=1.5))
    jobs.wait_phase("dog", "Running", 120)
    st = jobs.wait("dog", lambda s: (s.get("step") or 0) >= 1 and s.get("loss") is not None, 180, "progress")
    assert st["maxSteps"] == STEPS and st["stepsPerSecond"] and st["eta"] is not None
    st = jobs.wait_phase("dog", "Succeeded", 600)
    bucket = storage["bucket"]
    assert st["step"] == STEPS and st["attempt"] == 1 and st["restarts"] == 0 and st["preemptions"] == 0
    assert st["outputUri"] == f"s3://{bucket}/runs/dog/"
    assert st["logsUri"] == f"s3://{bucket}/runs/dog/logs/attempt-1/"
    assert st["lastCheckpoint"]["step"] >= 2 and st["lastCheckpoint"]["uri"].startswith(f"s3://{bucket}/runs/dog/")
    assert st["startTime"] and st["completionTime"] and st["observedGeneration"] == 1
    # The final validation's images (it runs after the last /progress poll: the termination message says them).
    assert st["validationImages"] and all(f"/validation/step-{STEPS}/" in u for u in st["validationImages"]), st
    keys = {o["Key"] for o in storage["client"].list_objects_v2(Bucket=bucket, Prefix="runs/dog/")["Contents"]}
    assert f"runs/dog/{WEIGHTS}" in keys
    assert any(k.startswith("runs/dog/logs/attempt-1/") for k in keys)
    # An uninterrupted run: the reference for the recovery tests below (step_delay never changes the math).
    _REFERENCE.setdefault("weights", final_weights(storage, "dog", tmp_path / "w"))


# The scheduler's preemption (DisruptionTarget, then the delete) is test_helm_install.py's preempted job.
@pytest.mark.parametrize("how", ["pod-deleted"])
def test_preempted_pod_resumes_bit_identical(
    how: str, jobs: Jobs, cluster: Cluster, storage: dict[str, Any], tmp_path: Path, trainer_image: str
) -> None:
    reference = reference_weights(jobs, storage, trainer_image, tmp_path / "base")

    # 40 MiB more state (never in the weights) puts files over one 16 MiB part: the two pods, one per node, each
    # upload their share of every checkpoint (checkpoint/shares.py), each through its own network namespace.
    pad = {"DREAMBOOTH_TEST_PAD_STATE_MB": "40"}
    jobs.create(real_job("pre", storage, trainer_image, step_delay=1.5, env_extra=pad))
    jobs.wait("pre", lambda s: (s.get("step") or 0) >= 3, 300, "step 3")
    if how == "pod-deleted":
        cluster.kube_api.delete(f"/api/v1/namespaces/{jobs.ns}/pods/pre-a1-1")
    else:
        cluster.preempt(jobs.ns, "pre-a1-1")  # DisruptionTarget/PreemptionByScheduler, then the delete
    st = jobs.wait("pre", lambda s: s.get("preemptions") == 1, 60, "preemption counted")
    expected = {"pod-deleted": "PodDeleted", "disruption-target": "DisruptionTarget"}[how]
    assert jobs.condition("pre", "Preempted")["reason"] == expected
    st = jobs.wait_phase("pre", "Succeeded", 600)
    assert (st["preemptions"], st["restarts"], st["attempt"]) == (1, 0, 2)
    assert st["logsUri"].endswith("/logs/attempt-2/")
    _assert_identical(final_weights(storage, "pre", tmp_path / "pre"), reference)
    log = storage["client"].get_object(Bucket=storage["bucket"], Key="runs/pre/logs/attempt-1/rank-0.log")
    shared = re.findall(
        r"checkpoint-\d+ shares: rank 0 (\d+) parts .*?, rank 1 (\d+) parts", log["Body"].read().decode()
    )
    assert shared and all(int(theirs) >= 1 for _, theirs in shared), shared
    keys = storage["client"].list_objects_v2(Bucket=storage["bucket"], Prefix="runs/pre/.shares/").get("KeyCount")
    assert not keys  # the shares' coordination objects are gone


# Extended tier (~3 min): node loss is handled in test_operator_cluster's fake-trainer test, exactness across a
# preemption by the test above and test_helm_install's preempted job.
@pytest.mark.extended
def test_node_loss_resumes_from_the_periodic_checkpoint_bit_identical(
    jobs: Jobs, cluster: Cluster, storage: dict[str, Any], tmp_path: Path, trainer_image: str
) -> None:
    reference = reference_weights(jobs, storage, trainer_image, tmp_path / "base")

    jobs.create(real_job("lost", storage, trainer_image, step_delay=2.0))
    jobs.wait("lost", lambda s: (s.get("lastCheckpoint") or {}).get("step", 0) >= 2, 300, "a periodic checkpoint")
    node = jobs.pods("lost")[1]["spec"]["nodeName"]
    cluster.node_lost(node)  # SIGKILL, no emergency checkpoint: the periodic one is the floor
    try:
        jobs.wait("lost", lambda s: s.get("preemptions") == 1, 240, "node loss counted as a preemption")
        st = jobs.wait_phase("lost", "Succeeded", 900)
    finally:
        cluster.node_recover(node)
    assert st["restarts"] == 0 and st["attempt"] == 2
    _assert_identical(final_weights(storage, "lost", tmp_path / "lost"), reference)


# Extended tier (suspend/resume and operator adoption are in the operator's fast tests; exactness across a
# preemption in test_helm_install and above).
@pytest.mark.extended
def test_operator_restart_then_suspend_and_resume_bit_identical(
    jobs: Jobs, operator: OperatorProcess, storage: dict[str, Any], tmp_path: Path, trainer_image: str
) -> None:
    reference = reference_weights(jobs, storage, trainer_image, tmp_path / "base")

    jobs.create(real_job("sus", storage, trainer_image, step_delay=2.5))
    seen = jobs.wait("sus", lambda s: (s.get("step") or 0) >= 1, 300, "step 1")["step"]
    operator.kill()  # a crash mid-run: the gang keeps training, the new operator must adopt it
    time.sleep(2)
    operator.start()
    before = jobs.wait("sus", lambda s: (s.get("step") or 0) > seen, 120, "progress read by the new operator")["step"]
    assert [p["metadata"]["name"] for p in jobs.pods("sus")] == ["sus-a1-0", "sus-a1-1"]

    jobs.patch_spec("sus", {"runPolicy": {"suspend": True}})
    st = jobs.wait("sus", lambda s: s.get("phase") == "Suspended"
                   and jobs.condition("sus", "Suspended").get("reason") == "Suspended", 120, "suspended")  # fmt: skip
    assert jobs.pods("sus") == []
    assert (st["attempt"], st["preemptions"], st["restarts"]) == (1, 0, 0)
    # The status names the emergency checkpoint the pods wrote on SIGTERM, the one a resume starts from.
    ck = st["lastCheckpoint"]
    assert latest_checkpoint(storage, "sus") == f"checkpoint-{ck['step']}", ck
    assert ck["step"] >= before, (ck, before)
    assert ck["uri"].rstrip("/").endswith(f"/runs/sus/checkpoint-{ck['step']}"), ck
    assert f"step {ck['step']}" in jobs.condition("sus", "Suspended")["message"]

    jobs.patch_spec("sus", {"runPolicy": {"suspend": False}})
    st = jobs.wait_phase("sus", "Succeeded", 600)
    assert (st["attempt"], st["preemptions"], st["restarts"]) == (2, 0, 0)
    _assert_identical(final_weights(storage, "sus", tmp_path / "sus"), reference)


def test_bad_input_fails_at_once_naming_the_field(jobs: Jobs, storage: dict[str, Any], trainer_image: str) -> None:
    job = real_job("empty", storage, trainer_image)
    job["spec"]["training"]["instanceDataDir"] = f"s3://{storage['bucket']}/data/nothing-here/"
    jobs.create(job)
    st = jobs.wait_phase("empty", "Failed", 300)
    failed = jobs.condition("empty", "Failed")
    assert failed["reason"] == "BadInput" and "instanceDataDir" in failed["message"], failed
    assert st["restarts"] == 0 and st["attempt"] == 1


# The model-family seam end to end: a job of another family's method runs in the released image, through the same
# operator, storage and status as SD. One pod, few steps: the gang and preemption paths are the family-free tests
# above.
FAMILIES = {"lora-sdxl": "sdxl", "lora-flux": "flux"}
FAMILY_TRAINING = {"flux": {"maxSequenceLength": 16}}  # the tiny Flux's T5 holds 16 tokens
FAMILY_DRAW = {"flux": {"max_sequence_length": 16, "height": 32, "width": 32}}


@pytest.mark.parametrize("method", sorted(FAMILIES))
def test_other_family_job_succeeds_and_its_lora_loads(
    method: str, jobs: Jobs, storage: dict[str, Any], tmp_path: Path, trainer_image: str
) -> None:
    family = FAMILIES[method]
    name = f"fam-{family}"
    training = tiny_training(name, storage["bucket"], 4, pretrainedModelNameOrPath=tiny_family_model(storage, family),
                             **FAMILY_TRAINING.get(family, {}))  # fmt: skip
    jobs.create(real_job(name, storage, trainer_image, nodes=1, method=method, training=training))
    st = jobs.wait_phase(name, "Succeeded", 600)
    assert st["step"] == 4 and (st["attempt"], st["restarts"], st["preemptions"]) == (1, 0, 0)
    assert latest_checkpoint(storage, name) == "checkpoint-4"  # the family's state saved like SD's, on S3
    out = tmp_path / "out"
    out.mkdir()
    storage["client"].download_file(storage["bucket"], f"runs/{name}/{WEIGHTS}", str(out / WEIGHTS))
    _assert_lora_changes_pipeline(family, out)


def _assert_lora_changes_pipeline(family: str, lora: Path) -> None:
    """The job's output is a LoRA the family's diffusers pipeline loads, and it changes what the pipeline draws."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from dreambooth_trainer.tiny import ensure_tiny_model

    def draw(with_lora: bool) -> np.ndarray:
        pipe = DiffusionPipeline.from_pretrained(ensure_tiny_model(family=family))
        pipe.set_progress_bar_config(disable=True)
        if with_lora:
            pipe.load_lora_weights(lora)
        gen = torch.Generator().manual_seed(0)
        image = pipe("a photo of sks dog", num_inference_steps=2, generator=gen, **FAMILY_DRAW.get(family, {})).images[
            0
        ]
        return np.asarray(image).astype(np.int16)

    assert not np.array_equal(draw(True), draw(False))
