"""The launcher's pure decisions: the stop deadline, torchrun's command line, the exit code and the termination
message (moved from tests/integration/test_launch.py: they start no process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth_trainer.launcher import decision as launch
from dreambooth_trainer.launcher.decision import (
    Outcome,
    StopInfo,
    decide,
    stop_deadline,
    torchrun_argv,
    torchrun_has_shutdown_timeout,
)

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------------------------- pure
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 110.0),  # default grace 120 s, margin 10 s
        ({"DREAMBOOTH_GRACE_SECONDS": "30"}, 27.0),  # margin 10%
        ({"DREAMBOOTH_GRACE_SECONDS": "15"}, 13.0),  # GKE spot: margin at least 2 s
        ({"DREAMBOOTH_GRACE_SECONDS": "600"}, 590.0),  # margin at most 10 s
        ({"DREAMBOOTH_GRACE_SECONDS": "30", "DREAMBOOTH_STOP_DEADLINE_SECONDS": "7.5"}, 7.5),  # explicit wins
    ],
)
def test_stop_deadline(env: dict[str, str], expected: float) -> None:
    assert stop_deadline(env) == expected


def test_torchrun_argv_single_node_and_gang() -> None:
    local = torchrun_argv(Path("/c.json"), 2, 110.0, {})
    assert "--standalone" in local and "--nproc-per-node=2" in local
    # torchrun must not SIGKILL the workers before the launcher's deadline.
    assert "--shutdown-timeout=115" in local
    # An older torchrun (torch 2.11) exits 2 on the flag: it is left out there.
    older = torchrun_argv(Path("/c.json"), 2, 110.0, {}, shutdown_timeout_flag=False)
    assert not [a for a in older if a.startswith("--shutdown-timeout")]
    assert [a for a in local if not a.startswith("--shutdown-timeout")] == older
    # The torch installed here is probed from its torchrun's source, without importing torch.
    import torch.distributed.run as run_module

    parser_flags = {o for a in run_module.get_args_parser()._actions for o in a.option_strings}
    assert torchrun_has_shutdown_timeout() == ("--shutdown-timeout" in parser_flags)
    gang = torchrun_argv(
        Path("/c.json"),
        8,
        27.0,
        {"PET_NNODES": "2", "PET_MASTER_ADDR": "j-0.j", "DREAMBOOTH_RDZV_TIMEOUT_SECONDS": "1860"},
    )
    assert "--standalone" not in gang and "--rdzv-conf=timeout=1860,join_timeout=1860" in gang
    assert gang[-5:] == ["-m", "dreambooth_trainer.launch", "--worker", "--config", "/c.json"]


def test_exit_code_is_the_root_cause_not_its_echoes() -> None:
    # Rank 1 ran out of GPU memory; rank 0 then died of the broken collective (70): the pod says 71.
    out = decide(
        nproc=2, rank_codes={0: 70, 1: 71}, detail={"exitCode": 70, "message": "gloo"}, torchrun_rc=1, stop=None
    )
    assert out.code == 71 and "local rank 1 exited 71" in out.message
    assert decide(nproc=2, rank_codes={0: 70, 1: 64}, detail=None, torchrun_rc=1, stop=None).code == 64
    # A rank without a result file was killed by a signal (host OOM killer, kill -9): a crash.
    killed = decide(nproc=2, rank_codes={0: 0, 1: None}, detail=None, torchrun_rc=1, stop=None)
    assert killed.code == 70 and "local rank 1 died without a result" in killed.message
    nobody = decide(nproc=1, rank_codes={}, detail=None, torchrun_rc=1, stop=None)
    assert nobody.code == 70 and "before any worker reported" in nobody.message
    done = decide(
        nproc=1, rank_codes={0: 0}, detail={"exitCode": 0, "step": 8}, torchrun_rc=0, stop=StopInfo("SIGTERM", 5)
    )
    assert done.code == 0  # finished before the SIGTERM could stop it: done is done


def test_preempted_says_which_checkpoint_stands() -> None:
    published = decide(
        nproc=1, rank_codes={0: 75}, torchrun_rc=1, stop=StopInfo("SIGTERM", 110, seconds=3.2),
        detail={"exitCode": 75, "step": 7, "checkpointUri": "s3://b/r/checkpoint-7", "message": "stopped at step 7"},
    )  # fmt: skip
    assert (published.code, published.step, published.checkpoint_uri) == (75, 7, "s3://b/r/checkpoint-7")
    late = decide(
        nproc=2, rank_codes={0: None, 1: None}, detail=None, torchrun_rc=-9, workers_seen=2,
        stop=StopInfo("SIGTERM", 13, killed_at_deadline=True), latest=lambda: (400, "s3://b/r/checkpoint-400"),
    )  # fmt: skip
    assert (late.code, late.step, late.checkpoint_uri) == (75, 400, "s3://b/r/checkpoint-400")
    assert "killed at the 13s stop deadline" in late.message and "nothing partial" in late.message
    fresh = decide(
        nproc=1, rank_codes={0: None}, detail=None, torchrun_rc=1, stop=StopInfo("SIGTERM", 13, killed_at_deadline=True)
    )
    assert fresh.checkpoint_uri is None and "starts from step 0" in fresh.message
    other_node = decide(
        nproc=1, rank_codes={0: 75}, torchrun_rc=1, stop=StopInfo("SIGTERM", 110), node_rank=1,
        detail={"exitCode": 75, "step": 7, "checkpointUri": None, "message": "stopped at step 7"},
    )  # fmt: skip
    assert other_node.code == 75 and other_node.step == 7 and "node 0" in other_node.message


def test_termination_message_fits_4_kib(tmp_path: Path) -> None:
    out = Outcome(70, 3, "s3://b/r/checkpoint-3", "é" * 10_000)
    text = out.termination_message()
    assert len(text.encode()) <= 4096
    assert json.loads(text)["reason"] == "Crashed"
    path = tmp_path / "termination-log"
    launch.write_termination_message(out, {"TERMINATION_MESSAGE_PATH": str(path)})
    assert json.loads(path.read_text())["step"] == 3
    # Not named and not in a pod (no /dev/termination-log): nothing is written, nothing fails.
    launch.write_termination_message(out, {})


def test_completed_outcome_carries_the_final_validation_images() -> None:
    images = [f"s3://b/runs/dog/validation/step-8-{i}.png" for i in range(4)]
    done = decide(
        nproc=2, rank_codes={0: 0, 1: 0}, torchrun_rc=0, stop=None,
        detail={"exitCode": 0, "step": 8, "checkpointUri": "s3://b/runs/dog/", "message": "training finished",
                "validationImages": images},
    )  # fmt: skip
    assert json.loads(done.termination_message())["validationImages"] == images
    # Over the kubelet's 4 KiB, trailing images go before the message is cut: reason and step always stay.
    many = Outcome(0, 8, "s3://b/runs/dog/", "training finished", validation_images=[images[0] + "x" * 300] * 40)
    doc = json.loads(many.termination_message())
    assert len(many.termination_message().encode()) <= 4096
    assert 0 < len(doc["validationImages"]) < 40 and doc["message"] == "training finished" and doc["step"] == 8
