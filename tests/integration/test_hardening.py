"""Issue 17's defects found by the adversarial review, each as the run a user would make (trainer on the tiny model)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tests.preemption_utils import LaunchedRun, training
from tests.trainer_utils import DOG, REPO, run_dreambooth, tiny_args, trainer_env

from dreambooth_api.config import ConfigError
from dreambooth_trainer.checkpoint import Claim, Publisher, Snapshot, TrainState, choose_resume, claim_output
from dreambooth_trainer.storage import Store, open_store

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------- item 4: a diverged run is never a success
@pytest.mark.parametrize(("command", "steps"), [("train", 6), ("train-lora", 1)])
def test_infinite_learning_rate_exits_64_and_publishes_nothing_non_finite(
    command: str, steps: int, tmp_path: Path
) -> None:
    """lr=inf: the weights are inf/NaN after step 1, the loss of step 2 is NaN. The full run stops on the loss; the
    one-step LoRA run has a finite loss throughout and is caught by the weight check before the final save."""
    out = tmp_path / "out"
    proc = run_dreambooth(
        [command, *tiny_args(out, steps=steps, ckpt=1, extra=["--learning_rate", "inf"])], check=False
    )
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert "diverged" in proc.stderr and "--learning_rate" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "model_index.json").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
    # Every checkpoint that exists holds finite weights only.
    for manifest in out.glob("checkpoint-*/manifest.json"):
        for f in manifest.parent.glob("training/*.safetensors"):
            for name, t in load_file(f).items():
                assert bool(t.isfinite().all()), f"{f}:{name} is not finite"


def test_diverged_run_reports_non_finite_loss_to_the_operator(tmp_path: Path) -> None:
    """Through the launcher: exit 64, termination reason NonFiniteLoss naming the step and the setting."""
    run = LaunchedRun(tmp_path, "full", training(str(tmp_path / "out"), steps=6, ckpt=100, learningRate=math.inf))
    assert run.run() == 64, run.log()
    term = run.termination()
    assert term["reason"] == "NonFiniteLoss", term
    assert "learningRate" in term["message"] and f"step {term['step']}" in term["message"], term


# ------------------------------------------------------- item 2: a damaged manifest, state or LATEST never blocks
def _store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    if kind == "local":
        return open_store(str(tmp_path / "out"))
    return open_store(f"s3://{request.getfixturevalue('bucket')}/out")


def _publish(store: Store, tmp_path: Path, step: int) -> None:
    state = TrainState(global_step=step, run_seed=7, config_hash="h", method="lora")
    snap = Snapshot(state=state, tensors={"training/unet.safetensors": {"w": torch.full((4,), float(step))}})
    Publisher(store, tmp_path / "scratch", None).submit(snap, background=False)


def _state_with_unknown_key(store: Store, tmp_path: Path) -> None:
    """The state gains a key this release does not know, and the manifest agrees with it (size and hash)."""
    doc = json.loads(store.read_bytes("checkpoint-2/trainer_state.json"))
    raw = json.dumps({**doc, "surprise": 1}).encode()
    manifest = json.loads(store.read_bytes("checkpoint-2/manifest.json"))
    manifest["files"]["trainer_state.json"] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    store.write_bytes("checkpoint-2/trainer_state.json", raw)
    store.write_bytes("checkpoint-2/manifest.json", json.dumps(manifest).encode())


DAMAGE = {
    "manifest {}": lambda store, tmp: store.write_bytes("checkpoint-2/manifest.json", b"{}"),
    'manifest {"files": "x"}': lambda store, tmp: store.write_bytes("checkpoint-2/manifest.json", b'{"files": "x"}'),
    "manifest []": lambda store, tmp: store.write_bytes("checkpoint-2/manifest.json", b"[]"),
    "manifest not UTF-8": lambda store, tmp: store.write_bytes("checkpoint-2/manifest.json", b"\xff\xfe{\x00"),
    "manifest entry without a size": lambda store, tmp: store.write_bytes(
        "checkpoint-2/manifest.json", b'{"files": {"trainer_state.json": {"sha256": "0"}}}'
    ),
    "manifest path leaving the checkpoint": lambda store, tmp: store.write_bytes(
        "checkpoint-2/manifest.json",
        b'{"files": {"trainer_state.json": {"size": 1, "sha256": "0"}, "../x": {"size": 1, "sha256": "0"}}}',
    ),
    "unknown key in trainer_state.json": _state_with_unknown_key,
}


@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_manifest_or_state_falls_back_to_the_previous_checkpoint(
    damage: str, kind: str, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(kind, tmp_path, request)
    _publish(store, tmp_path, 1)
    _publish(store, tmp_path, 2)
    DAMAGE[damage](store, tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = choose_resume(store, None, "h", tmp_path / "cache")
    assert loaded is not None and loaded.step == 1
    assert "cannot resume from checkpoint-2" in caplog.text, caplog.text


@pytest.mark.parametrize("kind", ["local", "s3"])
@pytest.mark.parametrize("latest", [b"\xff\x00garbage\n", b"checkpoint-99\n", b"checkpoint-x\n"])
def test_bad_latest_is_ignored_by_resume_and_repaired_by_the_next_publish(
    latest: bytes, kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = _store(kind, tmp_path, request)
    _publish(store, tmp_path, 1)
    store.write_bytes("LATEST", latest)
    loaded = choose_resume(store, None, "h", tmp_path / "cache")
    assert loaded is not None and loaded.step == 1
    _publish(store, tmp_path, 2)  # garbage LATEST made every publish fail (exit 70); checkpoint-99 was never fixed
    assert store.read_bytes("LATEST") == b"checkpoint-2\n"


def test_trainer_resumes_past_a_damaged_manifest(tmp_path: Path) -> None:
    """The review's run: exit 70 ('files') on every retry although an older good checkpoint existed."""
    out = tmp_path / "out"
    run_dreambooth(["train-lora", *tiny_args(out, steps=4, ckpt=2)])
    (out / "checkpoint-4" / "manifest.json").write_text("{}")
    (out / "LATEST").write_bytes(b"\xff garbage")
    proc = run_dreambooth(["train-lora", *tiny_args(out, steps=4, ckpt=2)])
    assert "cannot resume from checkpoint-4" in proc.stderr and "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert (out / "LATEST").read_text() == "checkpoint-4\n"  # checkpoint-4 made again, LATEST repaired


# ------------------------------------------------------------------ item 3: a bad image is bad input, named, at once
def test_truncated_image_is_exit_64_naming_it_unless_skipped(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(DOG, data)
    jpeg = next(p for p in sorted(data.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    cut = data / "cut.jpg"
    Image.open(jpeg).convert("RGB").save(cut, "JPEG")
    cut.write_bytes(cut.read_bytes()[:-2000])
    args = [*tiny_args(tmp_path / "out", steps=1, ckpt=100), "--instance_data_dir", str(data)]
    proc = run_dreambooth(["train-lora", *args], check=False)
    assert proc.returncode == 64 and "cut.jpg" in proc.stderr and "--skip_bad_images" in proc.stderr, proc.stderr
    proc = run_dreambooth(["train-lora", *args, "--skip_bad_images"])
    assert "skipping 1 bad image(s)" in proc.stderr and "cut.jpg" in proc.stderr


def _read_only_mount_works(tmp_path: Path) -> bool:
    probe = tmp_path / "ro-probe"
    probe.mkdir()
    cmd = 'mount --bind -o ro "$0" "$0" && ! touch "$0/x" 2>/dev/null'
    return subprocess.run(["unshare", "-m", "sh", "-c", cmd, str(probe)], capture_output=True).returncode == 0


def test_read_only_output_is_exit_64_naming_output_dir_before_the_model_loads(tmp_path: Path) -> None:
    """The review: a read-only output folder ended in a crash (70). As root, only a read-only mount can refuse."""
    if shutil.which("unshare") is None or not _read_only_mount_works(tmp_path):
        pytest.skip("needs unshare -m and bind mounts (root with CAP_SYS_ADMIN)")
    out = tmp_path / "out"
    out.mkdir()
    # A model folder the trainer would refuse (exit 64 naming --pretrained_model_name_or_path) if it got that far.
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    args = [*tiny_args(out, steps=1, ckpt=100), "--pretrained_model_name_or_path", str(no_model)]
    mount = 'mount --bind -o ro "$0" "$0" && shift && exec "$@"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", mount, str(out), "--", sys.executable, "-m", "dreambooth_trainer", "train-lora",
         *args],
        capture_output=True, text=True, timeout=300, env=trainer_env(), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert "--output_dir" in proc.stderr and "read-only file system" in proc.stderr, proc.stderr[-3000:]
    assert "pretrained_model_name_or_path" not in proc.stderr, "the model was looked at before the output"
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------ item 7: the model others can read
@pytest.mark.parametrize("command", ["train", "train-lora"])
def test_final_model_files_are_group_readable(command: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_dreambooth([command, *tiny_args(out, steps=1, ckpt=100)])
    model = [p for p in out.rglob("*") if p.is_file() and "checkpoint-" not in str(p) and "logs" not in p.parts]
    assert any(p.suffix == ".safetensors" for p in model)
    closed = [f"{p.relative_to(out)} {p.stat().st_mode & 0o777:o}" for p in model if not p.stat().st_mode & 0o040]
    assert not closed, f"not group-readable: {closed}"


# ------------------------------------------------------------------------ item 1: one writer per output prefix
TRIALS = 200


class _Delayed:
    """A Store whose every read and write waits first: a claim decided by a read and then a write would lose its
    race in nearly every trial, one decided by the store (a conditional create, an flock) in none."""

    SLOW = frozenset({"create_exclusive", "write_bytes", "read_bytes", "exists", "delete", "list"})

    def __init__(self, store: Store, delay: float) -> None:
        self._store, self._delay = store, delay

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in self.SLOW:
            return attr

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(self._delay)
            return attr(*args, **kwargs)

        return slow


def _race(store_for: Callable[[int], Store], uids: tuple[str, str], delay: float = 0.0) -> list[str]:
    """Two claims released by one barrier, TRIALS times on fresh prefixes: each trial's outcomes.

    With ``delay``, every store call waits that long first, and a winner waits again after its claim before its
    first write into the output: the claim alone must fence the other run, not the files the winner writes.
    """
    outcomes = []
    for trial in range(TRIALS):
        barrier = threading.Barrier(2)
        results: list[Any] = [None, None]

        def claim(i: int, trial: int = trial, barrier: threading.Barrier = barrier, results: list = results) -> None:
            store = store_for(trial)
            if delay:
                store = _Delayed(store, delay)  # type: ignore[assignment]
            barrier.wait()
            try:
                results[i] = claim_output(store, uids[i])
                if delay:
                    time.sleep(delay)
                    store.write_bytes(f"first-write-{i}", b"x")
            except ConfigError as exc:
                results[i] = exc
            except BaseException as exc:  # noqa: BLE001 - reported below
                results[i] = exc

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [r for r in results if isinstance(r, Claim)]
        lost = [r for r in results if isinstance(r, ConfigError)]
        for r in won:
            r.release()
        outcomes.append(f"{len(won)} won, {len(lost)} refused" + ("" if len(won) + len(lost) == 2 else f" {results}"))
    return outcomes


@pytest.mark.parametrize(
    ("kind", "uids"),
    [("local", ("", "")), ("local", ("job-a", "job-b")), ("s3", ("", "")), ("s3", ("job-a", "job-b"))],
    ids=["local-runs", "local-jobs", "s3-runs", "s3-jobs"],
)
@pytest.mark.parametrize("delay", [0.0, 0.003], ids=["", "delayed"])
def test_two_simultaneous_claims_one_wins(
    kind: str, uids: tuple[str, str], delay: float, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The review: 200 of 200 barrier-synchronised overlapping claims both succeeded (read-then-write)."""
    if kind == "local":
        outcomes = _race(lambda trial: open_store(str(tmp_path / f"out-{trial}")), uids, delay)
    else:
        bucket = request.getfixturevalue("bucket")
        clients = [open_store(f"s3://{bucket}"), open_store(f"s3://{bucket}")]  # one per contender, as two pods
        turn = itertools.count()
        outcomes = _race(lambda trial: clients[next(turn) % 2].child(f"out-{trial}"), uids, delay)
    bad = [f"trial {i}: {o}" for i, o in enumerate(outcomes) if o != "1 won, 1 refused"]
    assert not bad, bad[:5]


def test_a_local_lock_is_released_with_the_run(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "out"))
    claim_output(store, "").release()
    claim_output(store, "").release()  # the same command again, after the first ended


def _wait_for(check: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    for _ in range(600):
        if check():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_train_commands_on_one_output_exactly_one_trains(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "local":
        out, env = str(tmp_path / "out"), trainer_env(DREAMBOOTH_TEST_STEP_DELAY_SECONDS="1.0")
        store = open_store(out)
    else:
        out = f"s3://{request.getfixturevalue('bucket')}/out"
        env = {**request.getfixturevalue("aws_env"), **trainer_env(DREAMBOOTH_TEST_STEP_DELAY_SECONDS="1.0")}
        store = open_store(out)
    args = [sys.executable, "-m", "dreambooth_trainer", "train-lora", *tiny_args(out, steps=30, ckpt=3)]
    first = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: store.exists("LATEST"), first, "its first checkpoint")
        second = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 64, second.stderr[-3000:]
        assert "is in use by a run, pid" in second.stderr and str(first.pid) in second.stderr, second.stderr[-3000:]
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # The same command after the first ended resumes (the lock died with it / was removed at its end).
    again = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
