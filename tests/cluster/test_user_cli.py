"""The user CLI (`dreambooth get|watch|logs|images|download`, `kubectl dbj`) against the real apiserver and SeaweedFS.

The running job is the fake trainer of operator_support.py under the real operator (get, watch, logs through
pods/log, kubectl dbj). The S3 side reads what the real launcher and trainer wrote to the test's bucket: a 3-step
full fine-tune on the tiny model, preempted once (SIGTERM, emergency checkpoint, exit 75) and resumed as attempt
2 — checkpoints with their manifests, the final model with its sha256 metadata, both attempts' rank logs and
TensorBoard events, the validation images and the trainer's gallery page.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_harness import Cluster, tools
from operator_support import Jobs, fake_job

from gallery_check import check_gallery, render_in_chromium  # tests/ is on sys.path (tests/conftest.py)
from preemption_utils import LaunchedRun, training

pytestmark = pytest.mark.cluster


def cli_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    env = {**cluster.env(), **extra}
    # The console scripts (dreambooth, kubectl-dbj) of this interpreter's environment first: kubectl finds its
    # plugin on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}:{tools.bin_dir()}:{env['PATH']}"
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env.pop(proxy, None)
    return env


def dbj(cluster: Cluster, namespace: str, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`dreambooth ARGS -n NAMESPACE` as a user runs it (the console script, the cluster's admin kubeconfig)."""
    return subprocess.run(["dreambooth", *args, "-n", namespace], env=env or cli_env(cluster), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture
def cli(cluster: Cluster, namespace: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Callable[..., subprocess.CompletedProcess[str]]:  # fmt: skip
    """The same commands in this process (no interpreter start per call: the checks of errors and outputs)."""
    import dreambooth_cli

    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(proxy, raising=False)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        code = dreambooth_cli.main([*args, "-n", namespace])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_get_watch_and_live_logs_of_a_running_job(jobs: Jobs, cluster: Cluster, tmp_path: Path, cli: Any) -> None:
    ns = jobs.ns
    jobs.create(fake_job("seen", nodes=2, seconds=25))
    jobs.create(fake_job("bad", nodes=1, seconds=1, env={"FAKE_CODE": "64"}))
    env = cli_env(cluster)
    # watch from the first moment to the end: phase changes, Events, progress; exit 0 on Succeeded.
    watch = subprocess.Popen(["dreambooth", "watch", "seen", "-n", ns, "--interval", "0.5"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    follow: subprocess.Popen[str] | None = None
    try:
        jobs.wait("seen", lambda s: s.get("step") is not None, 60, "progress in status")
        table = dbj(cluster, ns, "get")
        assert table.returncode == 0, table.stderr
        head = table.stdout.splitlines()[0]
        assert head.split() == ["NAME", "PHASE", "ATTEMPT", "RESTARTS", "PREEMPTIONS", "QUEUE", "STEP", "MAX",
                                "LOSS", "ETA", "LAST-CHECKPOINT", "AGE"]  # fmt: skip
        assert table.stdout.splitlines()[1].split()[0] == "bad"
        cells = table.stdout.splitlines()[2].split()
        assert cells[:6] == ["seen", "Running", "1", "0", "0", "<none>"] and cells[7:11] == ["1000", "0.25", "42s", "2"]
        # While it runs, a rank's log comes from its pod, through the apiserver's pods/log.
        logs = dbj(cluster, ns, "logs", "seen", "--rank", "1")
        assert logs.returncode == 0, logs.stderr
        assert "fake trainer: attempt 1 rank 1" in logs.stdout, logs.stdout
        follow = subprocess.Popen(["dreambooth", "logs", "seen", "-f", "-n", ns], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        kubectl_logs = subprocess.run([str(tools.tool_path("kubectl")), "logs", "seen-a1-0", "--tail", "1", "-n", ns],
                                      env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert kubectl_logs.stdout == "fake trainer: attempt 1 rank 0 exit 0 after 25.0 s\n", kubectl_logs
        as_json = json.loads(cli("get", "seen", "-o", "json").stdout)
        assert as_json["status"]["attempt"] == 1 and as_json["metadata"]["name"] == "seen"
        as_yaml = yaml.safe_load(cli("get", "-o", "yaml").stdout)
        assert [j["metadata"]["name"] for j in as_yaml["items"]] == ["bad", "seen"]
        # kubectl's plugin mechanism: `kubectl dbj` runs the kubectl-dbj console script.
        plugin = subprocess.run([str(tools.tool_path("kubectl")), "dbj", "get", "seen", "-n", ns], env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert plugin.returncode == 0 and plugin.stdout.splitlines()[1].split()[0] == "seen", plugin
        # A failed job: watch says why and exits 1; a job that does not exist or no kubeconfig: one line, exit 1.
        failed = cli("watch", "bad", "--interval", "0.5")
        assert failed.returncode == 1 and failed.stdout.splitlines()[-1].startswith("bad Failed"), failed
        assert "instanceDataDir" in failed.stdout
        one_line_error(cli("get", "nope"), "dreamboothjob nope not found", ns)
        one_line_error(cli("watch", "nope"), "not found")
        one_line_error(cli("logs", "nope", "--kubeconfig", str(tmp_path / "missing")), "no kubeconfig", "--kubeconfig")
        out, err = watch.communicate(timeout=120)
    finally:
        for proc in (watch, follow):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert watch.returncode == 0, (out, err)
    # `logs -f` ended by itself when the container did, with everything it wrote.
    followed, ferr = follow.communicate(timeout=60)
    assert follow.returncode == 0 and followed == "fake trainer: attempt 1 rank 0 exit 0 after 25.0 s\n", ferr
    lines = out.splitlines()
    assert any(line.startswith("phase Running") or "-> Running" in line for line in lines), out
    assert any(line.startswith("event Normal AllPodsRunning") for line in lines), out
    assert any("/1000" in line and "loss 0.25" in line and "checkpoint 2" in line for line in lines), out
    assert lines[-1].startswith("seen Succeeded"), out


def _train_preempted(output: str, tmp: Path) -> None:
    """The real launcher and trainer, 3 full fine-tune steps on the tiny model, checkpoint and validation after
    every step, preempted once: attempt 1 gets SIGTERM after step 1 (emergency checkpoint, exit 75), attempt 2
    resumes and saves the final pipeline."""
    train = training(output, steps=3, ckpt=1, validationPrompt="a photo of sks dog", validationSteps=1,
                     numValidationImages=2)  # fmt: skip
    first = LaunchedRun(tmp, "full", train, name="a1", DREAMBOOTH_ATTEMPT="1", DREAMBOOTH_TEST_STEP_DELAY_SECONDS="1")
    first.start().wait_until("step 1", lambda p: (p.get("step") or 0) >= 1, timeout=300)
    first.signal(signal.SIGTERM)
    assert first.wait(120) == 75, first.log()
    second = LaunchedRun(tmp, "full", train, name="a2", DREAMBOOTH_ATTEMPT="2")
    assert second.run(300) == 0, second.log()


def test_download_logs_and_gallery_from_s3(cluster: Cluster, namespace: str, s3: Any, bucket: str, tmp_path: Path,
                                           cli: Any) -> None:  # fmt: skip
    out_uri = f"s3://{bucket}/runs/real/"
    env = cli_env(cluster, **s3.env())
    _train_preempted(out_uri, tmp_path / "runs")
    # The job object as the operator's users see it (no pods needed: everything here is read from S3).
    job = fake_job("real", nodes=1, training={"outputDir": out_uri, "validationPrompt": "a photo of sks dog"})
    job["spec"]["storage"] = {"endpoint": f"http://127.0.0.1:{s3.s3_port}", "region": s3.region, "pathStyle": True}
    cluster.kube_api.create(f"/apis/dreambooth.dev/v1alpha1/namespaces/{namespace}/dreamboothjobs", job)

    final = dbj(cluster, namespace, "download", "real", str(tmp_path / "model"), env=env)
    assert final.returncode == 0, final.stderr
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size > 0
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert not (tmp_path / "model" / "checkpoint-1").exists() and not (tmp_path / "model" / "logs").exists()
    ckpt = dbj(cluster, namespace, "download", "real", str(tmp_path / "ckpt"), "--checkpoint", "latest", env=env)
    assert ckpt.returncode == 0 and "checkpoint-3" in ckpt.stdout, ckpt.stderr
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["step"] == 3 and all((tmp_path / "ckpt" / rel).is_file() for rel in manifest["files"])
    presigned = cli("download", "real", "x", "--checkpoint", "1", "--presign")
    assert presigned.returncode == 0 and "X-Amz-Signature=" in presigned.stdout, presigned.stderr
    name, url = presigned.stdout.splitlines()[0].split("\t")
    with urllib.request.urlopen(url, timeout=30) as resp:  # a presigned URL needs no credentials
        assert resp.read() == s3.client().get_object(Bucket=bucket, Key=f"runs/real/checkpoint-1/{name}")["Body"].read()
    one_line_error(cli("download", "real", str(tmp_path / "c9"), "--checkpoint", "9"), "no checkpoint 9",
                   "complete checkpoints: 1, 2, 3")  # fmt: skip

    # Tampered objects are refused, naming the file: one byte changed in a checkpoint, the final weights replaced.
    client = s3.client()
    key = f"runs/real/checkpoint-1/{sorted(json.loads(client.get_object(Bucket=bucket, Key='runs/real/checkpoint-1/manifest.json')['Body'].read())['files'])[0]}"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 1
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    one_line_error(cli("download", "real", str(tmp_path / "t1"), "--checkpoint", "1"), key, "does not match")
    weights = "runs/real/unet/diffusion_pytorch_model.safetensors"
    meta = client.head_object(Bucket=bucket, Key=weights)["Metadata"]
    client.put_object(Bucket=bucket, Key=weights, Body=b"not the model", Metadata=meta)
    one_line_error(cli("download", "real", str(tmp_path / "t2")), weights, "does not match")
    assert not (tmp_path / "t2" / "unet" / "diffusion_pytorch_model.safetensors").exists()

    # After the run, each attempt's rank log comes from S3: the preempted one and the one that finished.
    first = dbj(cluster, namespace, "logs", "real", "--attempt", "1", env=env)
    assert first.returncode == 0 and "SIGTERM" in first.stdout and "model saved to" not in first.stdout, first.stderr
    second = dbj(cluster, namespace, "logs", "real", "--attempt", "2", env=env)
    assert second.returncode == 0 and "resumed from" in second.stdout and "model saved to" in second.stdout
    one_line_error(cli("logs", "real", "--attempt", "3"), "logs/attempt-1/rank-0.log, logs/attempt-2/rank-0.log")

    # TensorBoard's own loader reads both attempts' events from S3 (S3_ENDPOINT: its S3 reader's endpoint).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    os.environ["S3_ENDPOINT"] = f"http://127.0.0.1:{s3.s3_port}"
    try:
        losses = {}
        for attempt in (1, 2):
            events = EventAccumulator(f"{out_uri}logs/tensorboard/attempt-{attempt}/dreambooth",
                                      size_guidance={"scalars": 0}).Reload()  # fmt: skip
            losses[attempt] = [e.step for e in events.Scalars("loss")]
    finally:
        del os.environ["S3_ENDPOINT"]
    assert losses[1][0] == 1 and losses[2][-1] == 3 and losses[2][0] <= losses[1][-1] + 1, losses

    # The gallery: every image it shows decodes, newest step first, the prompt on the page.
    gallery = tmp_path / "gallery"
    shown = dbj(cluster, namespace, "images", "real", str(gallery), env=env)
    assert shown.returncode == 0, shown.stderr

    steps = check_gallery((gallery / "index.html").read_text())
    assert steps == [(3, 2), (2, 2), (1, 2)], steps  # attempt 1's validations too
    assert "a photo of sks dog" in (gallery / "index.html").read_text()
    # The trainer wrote the same page to the output at its last validation.
    written = s3.client().get_object(Bucket=bucket, Key="runs/real/validation/index.html")["Body"].read().decode()
    assert check_gallery(written) == steps and "a photo of sks dog" in written
    # ... and a real browser shows every one of them (the screenshot stays in the test's tmp folder).
    decoded, total = render_in_chromium(gallery / "index.html", tmp_path / "gallery.png")
    assert decoded == total == sum(n for _, n in steps) and (tmp_path / "gallery.png").stat().st_size > 0

    # A fresh process (boto3 caches the credentials it found in this one).
    no_creds = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    no_creds["AWS_CONFIG_FILE"] = no_creds["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    one_line_error(dbj(cluster, namespace, "download", "real", str(tmp_path / "n"), env=no_creds), "no S3 credentials")
