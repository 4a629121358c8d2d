"""Every trainer path on a real S3 server (SeaweedFS, signatures checked): model, instance data, class data and
output are s3:// prefixes, and the CLI runs as a real process.

- full and LoRA runs killed with SIGKILL (mid-upload for the full run, right after a checkpoint for LoRA) and
  resumed by the same command end bit-identical to an uninterrupted run;
- a partial checkpoint (files, no manifest) is never resumed from; an altered or truncated checkpoint file
  makes resume fall back to the previous checkpoint, and says so;
- class images are a stage of their own: generated once into the s3:// class folder with a manifest, then
  reused; a folder made for another class prompt is refused;
- the S3 server down for ~20 s mid-run: uploads retry, training finishes, LATEST never names an incomplete
  checkpoint; per-rank logs reach <output>/logs/attempt-N/rank-R.log, also on failure;
- bad credentials, a missing bucket, an empty model or data prefix, an output owned by another job: exit 64
  before any model loads, naming the setting to fix.

Test-only knobs: DREAMBOOTH_TEST_STEP_DELAY_SECONDS (train.py) paces steps so a kill or an outage lands where
wanted; DREAMBOOTH_TEST_SAVE_DELAY_SECONDS (checkpoint.py) holds a checkpoint between its files and its manifest.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.trainer_utils import CLASS_DOG, DOG, REPO, assert_identical, trainer_env, weights

from dreambooth_trainer import checkpoint as ckpt
from dreambooth_trainer.storage import Store, open_store

pytestmark = pytest.mark.integration

PROMPT = "a photo of sks dog"
CMD = {"full": "train", "lora": "train-lora"}


@dataclass
class Inputs:
    bucket: str

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{rel}"

    def args(
        self, out: str, *, steps: int, ckpt_every: int, class_dir: str, num_class: int, extra: tuple = ()
    ) -> list[str]:
        return [
            "--pretrained_model_name_or_path", self.uri("model/"),
            "--instance_data_dir", self.uri("data/dog/"),
            "--instance_prompt", PROMPT,
            "--output_dir", out,
            "--resolution", "32",
            "--train_batch_size", "1",
            "--max_train_steps", str(steps),
            "--checkpointing_steps", str(ckpt_every),
            "--seed", "7",
            "--with_prior_preservation", "--class_data_dir", class_dir,
            "--class_prompt", "a photo of dog", "--num_class_images", str(num_class),
            "--report_to", "none",
            *extra,
        ]  # fmt: skip


@pytest.fixture(scope="module")
def inputs(s3) -> Iterator[Inputs]:  # noqa: ANN001 - the session's SeaweedS3
    """One bucket per module holding the tiny pipeline (a diffusers folder), the dog images and 4 class images."""
    from dreambooth_trainer.tiny import ensure_tiny_model

    if not s3.running:
        s3.start()
    bucket = s3.make_bucket(f"t-{uuid.uuid4().hex[:12]}")
    root = open_store(f"s3://{bucket}")
    root.child("model").upload_dir(ensure_tiny_model(), "")
    root.child("data/dog").upload_dir(DOG, "")
    root.child("data/class-dog").upload_dir(CLASS_DOG, "")
    yield Inputs(bucket)
    if s3.running:
        s3.delete_bucket(bucket)


class Trainer:
    """`python -m dreambooth_trainer CMD ARGS` with its output in a file (a pipe could fill up and block it)."""

    def __init__(self, workdir: Path, name: str, cmd: str, args: list[str], **env: str) -> None:
        self.log_path = workdir / f"{name}.log"
        env.setdefault("PROGRESS_PORT", "off")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dreambooth_trainer", cmd, *args],
                env=trainer_env(**env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"trainer still running after {timeout}s\n{self.log()[-4000:]}") from None

    def ok(self, timeout: float = 300) -> str:
        code = self.wait(timeout)
        assert code == 0, f"trainer exited {code}\n{self.log()[-4000:]}"
        return self.log()

    def wait_until(self, what: str, check: Callable[[], bool], timeout: float = 240) -> None:
        """Poll check() (S3 reads) until it holds; fail if the run ends first."""
        end = time.monotonic() + timeout
        while not check():
            if self.proc.poll() is not None:
                raise AssertionError(f"trainer exited {self.proc.returncode} before {what}\n{self.log()[-4000:]}")
            if time.monotonic() > end:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def kill_when(self, what: str, check: Callable[[], bool], timeout: float = 240) -> None:
        """SIGKILL the moment check() holds."""
        self.wait_until(what, check, timeout)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _final_weights(store: Store, method: str, dest: Path) -> dict:
    rel = "pytorch_lora_weights.safetensors" if method == "lora" else "unet/diffusion_pytorch_model.safetensors"
    store.download_file(rel, dest / rel)
    return weights(dest, method)


def _has_files_without_manifest(store: Store, name: str) -> bool:
    keys = {o.key for o in store.list(name)}
    return bool(keys) and f"{name}/{ckpt.MANIFEST}" not in keys


# Extended tier: test_checkpoint_stream's kill -9 mid-parts covers the default run's upload path.
@pytest.mark.extended
def test_full_all_on_s3_killed_mid_upload_resumes_exactly(inputs: Inputs, tmp_path: Path) -> None:
    """Full fine-tune, prior preservation with class images generated into S3. Run B is SIGKILLed while
    checkpoint-4 is uploaded (files there, manifest not yet); the same command resumes from checkpoint-2,
    reuses the class images, and ends bit-identical to run A."""
    classes = inputs.uri("class-generated/")

    def args(out: str) -> list[str]:
        return inputs.args(out, steps=6, ckpt_every=2, class_dir=classes, num_class=3,
                           extra=("--validation_prompt", PROMPT, "--num_validation_images", "1",
                                  "--validation_steps", "3"))  # fmt: skip

    ref_uri, run_uri = inputs.uri("full-a/"), inputs.uri("full-b/")
    class_store = open_store(classes)
    a = Trainer(tmp_path, "a", "train", args(ref_uri))
    # B starts once A's class-image stage is complete (it must reuse them, not make its own), then runs beside A.
    a.wait_until("the class images", lambda: class_store.exists(".dreambooth-class-images.json"))
    run = open_store(run_uri)
    b = Trainer(
        tmp_path, "b", "train", args(run_uri), DREAMBOOTH_JOB_UID="job-b",
        DREAMBOOTH_TEST_SAVE_DELAY_SECONDS="4", DREAMBOOTH_TEST_SAVE_DELAY_KIND="periodic",
    )  # fmt: skip
    b.kill_when(
        "checkpoint-4 uploading after checkpoint-2 is complete",
        lambda: run.exists("checkpoint-2/manifest.json") and _has_files_without_manifest(run, "checkpoint-4"),
    )
    assert "reusing 3 class image(s)" in b.log(), b.log()[-3000:]
    assert not run.exists("checkpoint-4/manifest.json") and run.read_text("LATEST").strip() == "checkpoint-2"
    assert run.read_text(".owner").strip() == "job-b"
    resume = Trainer(tmp_path, "b-resume", "train", args(run_uri), DREAMBOOTH_JOB_UID="job-b")

    log = a.ok()
    assert "3 missing; this rank generates 3" in log, log[-3000:]
    manifest = json.loads(class_store.read_text(".dreambooth-class-images.json"))
    assert manifest["count"] == 3 and manifest["resolution"] == 32 and manifest["classPrompt"] == "a photo of dog"
    assert manifest["model"] == inputs.uri("model/") and len(manifest["files"]) == 3
    # Final outputs and validation images are in S3 when the trainer exits 0.
    ref = open_store(ref_uri)
    keys = {o.key for o in ref.list("")}
    assert {
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "README.md",
        "LATEST",
        "validation/step-3/image-0.png",
        "validation/step-6/image-0.png",
        "logs/attempt-0/rank-0.log",
    } <= keys
    assert "model saved to" in ref.read_text("logs/attempt-0/rank-0.log")

    log = resume.ok()
    assert f"resumed from {run.url('checkpoint-2')} at step 2" in log, log[-3000:]
    assert "cannot resume from checkpoint-4" not in log  # no manifest: not a checkpoint at all
    assert_identical(_final_weights(ref, "full", tmp_path / "a"), _final_weights(run, "full", tmp_path / "b"))


# Extended tier (damaged-checkpoint fallback: test_hardening stays in the default run).
@pytest.mark.extended
@pytest.mark.slow
def test_lora_all_on_s3_killed_then_altered_checkpoint_falls_back(inputs: Inputs, tmp_path: Path, caplog) -> None:
    """LoRA with user class images in S3. Run B is SIGKILLed right after checkpoint-4 is published; a byte of
    checkpoint-4 is then altered, so the same command falls back to checkpoint-2 (and says so) and still ends
    bit-identical to run A. Then a truncated file in the newest checkpoint: resume picks the one before."""
    classes = inputs.uri("data/class-dog/")

    def args(out: str) -> list[str]:
        return inputs.args(out, steps=8, ckpt_every=2, class_dir=classes, num_class=4)

    ref_uri, run_uri = inputs.uri("lora-a/"), inputs.uri("lora-b/")
    run = open_store(run_uri)
    a = Trainer(tmp_path, "a", "train-lora", args(ref_uri))
    b = Trainer(tmp_path, "b", "train-lora", args(run_uri), DREAMBOOTH_TEST_STEP_DELAY_SECONDS="0.5")
    b.kill_when("checkpoint-4 published", lambda: run.exists("checkpoint-4/manifest.json"))
    a.ok()
    assert not run.exists("pytorch_lora_weights.safetensors"), "run B finished before the kill"

    name = "checkpoint-4/pytorch_lora_weights.safetensors"  # format 3: the adapters' only copy
    data = bytearray(run.read_bytes(name))
    data[-1] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    run.write_bytes(name, bytes(data))
    log = Trainer(tmp_path, "b-resume", "train-lora", args(run_uri)).ok()
    assert "cannot resume from checkpoint-4: checkpoint-4: file pytorch_lora_weights.safetensors does not match" in log
    assert "falling back to the previous checkpoint" in log
    assert f"resumed from {run.url('checkpoint-2')} at step 2" in log, log[-3000:]
    assert_identical(
        _final_weights(open_store(ref_uri), "lora", tmp_path / "a"), _final_weights(run, "lora", tmp_path / "b")
    )

    name = "checkpoint-8/pytorch_lora_weights.safetensors"
    run.write_bytes(name, run.read_bytes(name)[:-100])
    config_hash = json.loads(run.read_text("checkpoint-8/manifest.json"))["configHash"]
    caplog.set_level(logging.WARNING, logger="dreambooth_trainer.checkpoint")
    loaded = ckpt.choose_resume(run, None, config_hash, tmp_path / "resume-cache")
    assert loaded is not None and loaded.step == 6
    assert (
        "cannot resume from checkpoint-8: checkpoint-8: file pytorch_lora_weights.safetensors does not match"
        in caplog.text
    )


# Extended tier: test_checkpoint_stream's outage mid-stream covers retries and LATEST in the default run.
@pytest.mark.extended
def test_s3_down_for_20s_mid_run_uploads_retry_and_latest_stays_complete(s3, inputs: Inputs, tmp_path: Path) -> None:  # noqa: ANN001
    uri = inputs.uri("outage/")
    run = open_store(uri)
    args = inputs.args(uri, steps=12, ckpt_every=3, class_dir=inputs.uri("data/class-dog/"), num_class=4)
    trainer = Trainer(
        tmp_path, "run", "train-lora", args,
        DREAMBOOTH_TEST_STEP_DELAY_SECONDS="0.5", DREAMBOOTH_LOG_UPLOAD_SECONDS="2",
    )  # fmt: skip

    # A watcher that reads LATEST the way a resuming pod would, all through the run and the outage.
    watcher_store = open_store(uri, retry_deadline_s=0.5, max_attempts=1)
    seen: set[str] = set()
    violations: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                name = watcher_store.read_text("LATEST").strip()
                manifest = json.loads(watcher_store.read_text(f"{name}/manifest.json"))
                sizes = {o.key: o.size for o in watcher_store.list(name)}
                for rel, meta in manifest["files"].items():
                    if sizes.get(f"{name}/{rel}") != meta["size"]:
                        violations.append(f"LATEST names {name} but {rel} is missing or has the wrong size")
                seen.add(name)
            except Exception as exc:  # noqa: BLE001 - server down, or LATEST not written yet
                if "manifest.json does not exist" in str(exc):
                    violations.append(f"LATEST names a checkpoint without a manifest: {exc}")
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 240
        while not run.exists("checkpoint-3/manifest.json"):
            assert trainer.proc.poll() is None and time.monotonic() < end, trainer.log()[-4000:]
            time.sleep(0.1)
        s3.stop()
        time.sleep(20)
        assert trainer.proc.poll() is None, "training stopped while S3 was down\n" + trainer.log()[-4000:]
        s3.start()
        log = trainer.ok(timeout=300)
    finally:
        done.set()
        thread.join()
        if not s3.running:
            s3.start()
    assert not violations, violations
    assert "retrying" in log, log[-4000:]
    assert run.read_text("LATEST").strip() == "checkpoint-12" and "checkpoint-12" in seen
    assert ckpt.checkpoint_steps(run) == [12, 9, 6, 3]
    assert run.exists("pytorch_lora_weights.safetensors")
    rank_log = run.read_text("logs/attempt-0/rank-0.log")
    assert "per-rank log upload" in rank_log and "works again" in rank_log, rank_log[-3000:]
    assert "model saved to" in rank_log


def test_bad_s3_inputs_exit_64_before_training_naming_the_setting(s3, inputs: Inputs, tmp_path: Path) -> None:  # noqa: ANN001
    """Each case in its own process, all at once (they spend their time importing torch)."""
    open_store(inputs.uri("owned/")).write_text(".owner", "job-of-someone-else\n")
    open_store(inputs.uri("class-cat/")).write_text(
        ".dreambooth-class-images.json",
        json.dumps({"model": inputs.uri("model/"), "classPrompt": "a photo of cat", "files": []}),
    )

    def args(out: str, **change: str) -> list[str]:
        base = inputs.args(out, steps=2, ckpt_every=2, class_dir=inputs.uri("data/class-dog/"), num_class=4)
        for flag, value in change.items():
            base[base.index(f"--{flag}") + 1] = value
        return base

    cases = {
        "credentials": (args(inputs.uri("bad-1/")), {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
                        "--output_dir (spec.training.outputDir): access denied to"),
        "bucket": (args("s3://no-such-bucket-here/run/"), {},
                   "--output_dir (spec.training.outputDir): bucket 'no-such-bucket-here' does not exist"),
        "model": (args(inputs.uri("bad-3/"), pretrained_model_name_or_path=inputs.uri("no-model/")), {},
                  f"--pretrained_model_name_or_path (spec.training.pretrainedModelNameOrPath): "
                  f"{inputs.uri('no-model/')} holds no objects"),
        "data": (args(inputs.uri("bad-4/"), instance_data_dir=inputs.uri("data/no-dog/")), {"DREAMBOOTH_ATTEMPT": "3"},
                 f"--instance_data_dir (spec.training.instanceDataDir): {inputs.uri('data/no-dog/')} holds no objects"),
        "owner": (args(inputs.uri("owned/")), {"DREAMBOOTH_JOB_UID": "job-mine"},
                  "--output_dir (spec.training.outputDir): " + inputs.uri("owned")
                  + " belongs to another job (UID job-of-someone-else)"),
        "class": (args(inputs.uri("bad-6/"), class_data_dir=inputs.uri("class-cat/")), {},
                  "--class_data_dir (spec.training.classDataDir): " + inputs.uri("class-cat/")
                  + " holds class images generated for class prompt 'a photo of cat'"),
    }  # fmt: skip
    runs = {name: Trainer(tmp_path, name, "train-lora", a, **env) for name, (a, env, _) in cases.items()}
    for name, run in runs.items():
        code = run.wait(240)
        log = run.log()
        assert code == 64, f"{name}: exit {code}\n{log[-3000:]}"
        assert cases[name][2] in log, f"{name}: {log[-3000:]}"
        assert "step 1/" not in log and "Loading weights" not in log, f"{name} loaded a model:\n{log[-3000:]}"

    assert open_store(inputs.uri("owned/")).read_text(".owner").strip() == "job-of-someone-else"
    assert [o.key for o in open_store(inputs.uri("owned/")).list("")] == [".owner"], "wrote into another job's prefix"
    # A failed run's log is uploaded too, traceback included, under its attempt number.
    failed = open_store(inputs.uri("bad-4/"))
    assert not [o.key for o in failed.list("") if o.key.startswith("checkpoint-")]
    rank_log = failed.read_text("logs/attempt-3/rank-0.log")
    assert "run ended (exit 64):" in rank_log and "holds no objects" in rank_log, rank_log


def test_rank_log_uploads_periodically_and_never_waits_on_a_dead_s3(
    inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dreambooth_trainer.logs import RankLog
    from s3server import pick_base_port

    log = logging.getLogger("dreambooth_trainer.test_rank_log")
    monkeypatch.setenv("DREAMBOOTH_LOG_UPLOAD_SECONDS", "0.2")
    store = open_store(inputs.uri("rank-log/"))
    rank_log = RankLog(tmp_path / "up" / "rank-1.log")
    rank_log.start_upload(store.uri, "logs/attempt-2/rank-1.log")
    log.warning("first line")
    end = time.monotonic() + 30
    while "first line" not in (
        store.read_text("logs/attempt-2/rank-1.log") if store.exists("logs/attempt-2/rank-1.log") else ""
    ):
        assert time.monotonic() < end, "no periodic upload"
        time.sleep(0.1)
    try:
        raise RuntimeError("boom in the loop")
    except RuntimeError as exc:
        rank_log.close(exc)
    text = store.read_text("logs/attempt-2/rank-1.log")
    assert "run ended (exit 70):" in text and "RuntimeError: boom in the loop" in text
    assert rank_log.handler not in logging.getLogger().handlers

    # Nothing listens on this endpoint: every upload fails, yet logging and close() return at once.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{pick_base_port(1)}")
    monkeypatch.setenv("DREAMBOOTH_LOG_UPLOAD_DEADLINE_SECONDS", "1")
    dead = RankLog(tmp_path / "dead" / "rank-0.log")
    dead.start_upload(store.uri, "logs/attempt-0/rank-0.log")
    t0 = time.monotonic()
    for i in range(200):
        log.warning("line %d", i)
    assert time.monotonic() - t0 < 1.0
    time.sleep(1.0)  # a few failed periodic uploads
    t0 = time.monotonic()
    dead.close()
    assert time.monotonic() - t0 < 4.0  # bounded by the upload deadline, not the checkpoints' two minutes
    text = (tmp_path / "dead" / "rank-0.log").read_text()
    assert "line 199" in text and "per-rank log upload to" in text and "failed" in text


MODEL_FILES = {
    "full": ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"],
    "lora": ["pytorch_lora_weights.safetensors"],
}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_second_run_to_an_emptied_s3_output_uploads_the_whole_model(
    method: str, inputs: Inputs, tmp_path: Path
) -> None:
    """Issue #15: a second run to the same s3:// output on one machine found the first run's files in a scratch
    folder keyed by the output, uploaded none of its model and still said "model saved"."""
    out = inputs.uri(f"again-{method}/")
    store = open_store(out)
    scratch = tmp_path / "scratch"  # one machine: both runs share the scratch base, as they would in $TMPDIR
    args = inputs.args(out, steps=2, ckpt_every=100, class_dir=inputs.uri("data/class-dog/"), num_class=4)
    args[args.index("--report_to") + 1] = "tensorboard"
    events: list[set[str]] = []
    for attempt in (1, 2):
        Trainer(tmp_path, f"{method}-{attempt}", CMD[method], args, DREAMBOOTH_SCRATCH=str(scratch)).ok()
        keys = {o.key for o in store.list("")}
        missing = [f for f in MODEL_FILES[method] if f not in keys]
        assert not missing, f"run {attempt}: {missing} not in {out}: {sorted(keys)}"
        events.append({k for k in keys if "tfevents" in k})
        assert events[-1], f"run {attempt} uploaded no TensorBoard events: {sorted(keys)}"
        for key in keys:
            store.delete(key)
    assert not events[0] & events[1], "the second run uploaded the first run's TensorBoard files"
    # Each run's scratch folder is its own and is removed at its end.
    assert not [p for p in scratch.rglob("*") if p.is_file()], sorted(scratch.rglob("*"))


def test_final_upload_that_fails_is_not_reported_as_saved(s3, inputs: Inputs, tmp_path: Path) -> None:  # noqa: ANN001
    out = inputs.uri("final-fails/")
    args = inputs.args(out, steps=2, ckpt_every=100, class_dir=inputs.uri("data/class-dog/"), num_class=4)
    run = Trainer(
        tmp_path, "final-fails", "train-lora", args,
        DREAMBOOTH_TEST_FINAL_UPLOAD_DELAY_SECONDS="3", DREAMBOOTH_S3_RETRY_DEADLINE_S="5",
    )  # fmt: skip
    try:
        run.wait_until("the final upload", lambda: "uploading the final model" in run.log())
        s3.stop()
        code = run.wait(240)
    finally:
        s3.start()
    log = run.log()
    assert code != 0, log[-3000:]
    assert code == 70, f"exit {code}\n{log[-3000:]}"
    assert "model saved to" not in log and "\ndone: " not in log, log[-3000:]
