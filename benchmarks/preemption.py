"""Preemption benchmark: how fast SIGTERM becomes a durable checkpoint, and how much state fits a grace period.

    python benchmarks/preemption.py                      # local disk and SeaweedFS (if `weed` is installed)
    python benchmarks/preemption.py --no-s3 --sizes-mb 256,1024 --repeats 2
    python benchmarks/preemption.py --no-local --repeats 0 --s3-sizes-mb 1024 --nproc 2   # checkpoint shares

Each trial is the real thing: `python -m dreambooth_trainer.launch` (torchrun, one worker) on the tiny model,
SIGTERM to the launcher once training runs, and the output folder polled until a new complete checkpoint
(manifest + LATEST) appears. Figures, one line each:

- tiny model: SIGTERM -> durable checkpoint seconds, SIGTERM -> launcher exit seconds, and steps lost per
  preemption (steps finished before the signal that the durable checkpoint does not hold; target 0);
- padded state (DREAMBOOTH_TEST_PAD_STATE_MB adds N MiB of random bytes to every checkpoint: a bigger model's
  weights and optimizer state): SIGTERM -> durable seconds per size, then the largest state made durable within
  15 s (GKE spot), 30 s and 120 s (AWS spot notice, the default grace period), measured and extrapolated linearly;
- the best plain transfer of the same number of bytes to the same destination in the same run, and the ratio
  (target <= 1.25x): S3 = boto3's TransferManager uploading from memory with the part size and concurrency below
  (fixed here, printed); local disk = `dd bs=16M conv=fsync`. The checkpoint streams from its RAM snapshot with
  the publisher's own part size and concurrency (checkpoint/publisher.py), printed beside it.

`--nproc 2` runs world size 2 (torchrun, gloo) with `DREAMBOOTH_CHECKPOINT_SHARES=rank`: an `s3://` checkpoint
is then shared, each rank uploading about half of it (checkpoint/shares.py), and each trial prints what each rank uploaded. Both ranks share this machine's
loopback and CPUs, so the gain here is a floor of what two nodes with a NIC each would see.

The stop deadline is set high here so that the true time is measured; in a pod the launcher would give up at
the deadline and the previous periodic checkpoint would stand.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from tests.preemption_utils import LaunchedRun, training  # noqa: E402

BUDGETS = (15.0, 30.0, 120.0)
PLAIN_PART_MB = 16
PLAIN_CONCURRENCY = 10


def _latest_reader(uri: str) -> Callable[[], int | None]:
    """A cheap 'newest complete checkpoint' probe: LATEST, then its manifest."""
    from dreambooth_trainer.storage import NotFoundError, open_store

    store = open_store(uri)

    def read() -> int | None:
        try:
            name = store.read_text("LATEST").strip()
        except NotFoundError:
            return None
        return int(name.rsplit("-", 1)[1]) if store.exists(f"{name}/manifest.json") else None

    return read


NPROC = 1  # --nproc


def trial(
    work: Path, uri: str, *, pad_mb: int = 0, warm_steps: int = 6, ckpt: int = 4, **train_extra: object
) -> dict[str, float]:
    """One preemption: train, SIGTERM at a step, time until durable and until exit.

    ``train_extra`` overrides spec.training fields (another model, resolution, mixed precision).
    """
    # The ranks run on this one host: `rank` makes each an uploader (the default is one per node).
    env = {"DREAMBOOTH_STOP_DEADLINE_SECONDS": "900", "DREAMBOOTH_CHECKPOINT_SHARES": "rank"}
    if pad_mb:
        env["DREAMBOOTH_TEST_PAD_STATE_MB"] = str(pad_mb)
    train = training(uri, "full", steps=100_000, ckpt=ckpt, **train_extra)
    run = LaunchedRun(work, "full", train, nproc=NPROC, **env).start()
    latest = _latest_reader(uri)
    try:
        run.wait_until(f"step {warm_steps}", lambda s: s["step"] >= warm_steps, timeout=600)
        snap = run.progress() or {}
        step_at_signal = snap.get("step", 0)
        t0 = time.monotonic()
        run.signal()
        # Durable = a complete checkpoint holding every step known to be done when the signal went out.
        durable_step = None
        while durable_step is None or durable_step < step_at_signal:
            durable_step = latest()
            if run.proc is not None and run.proc.poll() is not None and (durable_step or 0) < step_at_signal:
                raise RuntimeError(f"launcher exited {run.proc.returncode} without a new checkpoint\n{run.log()}")
            time.sleep(0.01)
        durable = time.monotonic() - t0
        rc = run.wait(900)
        exited = time.monotonic() - t0
    except BaseException:
        run.kill_tree()
        raise
    if rc != 75:
        raise RuntimeError(f"launcher exited {rc}\n{run.log()}")
    term = run.termination()
    assert term["step"] >= durable_step, (term, durable_step)
    for line in run.log(1_000_000).splitlines():
        if " shares: rank 0" in line:
            print(f"  {line.split(' INFO: ', 1)[-1]}", flush=True)
    return {
        "durable": durable,
        "exit": exited,
        "lost": max(0, step_at_signal - durable_step),
        "after": durable_step - step_at_signal,
    }


def bench_tiny(name: str, make_uri: Callable[[str], str], root: Path, repeats: int) -> None:
    if repeats <= 0:
        return
    results = [trial(root / f"tiny-{name}-{i}", make_uri(f"tiny-{i}")) for i in range(repeats)]
    d = [r["durable"] for r in results]
    e = [r["exit"] for r in results]
    lost = [int(r["lost"]) for r in results]
    after = [int(r["after"]) for r in results]
    print(
        f"tiny model, {name}: SIGTERM -> durable checkpoint {statistics.median(d):.2f} s median "
        f"(min {min(d):.2f}, max {max(d):.2f}, n={repeats}); SIGTERM -> launcher exit {statistics.median(e):.2f} s median; "
        f"steps lost per preemption {lost} (target 0); steps between the last /progress reading and the stop step {after}",
        flush=True,
    )


def plain_transfer(uri: str, mb: int) -> tuple[float, str]:
    """Seconds for the best plain transfer of `mb` MiB to where `uri` points, and what it was."""
    if uri.startswith("s3://"):
        return _plain_s3(uri, mb)
    return _plain_dd(Path(uri), mb)


def _plain_dd(folder: Path, mb: int) -> tuple[float, str]:
    """dd of random bytes (from a tmpfs copy, so the source costs nothing) with one fsync; best of 3: the disk
    is shared with whatever else runs here."""
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else folder
    source = shm / f"bench-preemption-{os.getpid()}.bin"
    source.write_bytes(os.urandom(mb << 20))
    target = folder / "dd.bin"
    best = float("inf")
    try:
        for _ in range(3):
            t0 = time.monotonic()
            subprocess.run(["dd", f"if={source}", f"of={target}", "bs=16M", "conv=fsync"], check=True,
                           capture_output=True)  # fmt: skip
            best = min(best, time.monotonic() - t0)
            target.unlink()
    finally:
        source.unlink()
    return best, "dd bs=16M conv=fsync of random bytes from tmpfs, best of 3"


def _plain_s3(uri: str, mb: int) -> tuple[float, str]:
    import io

    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    client = boto3.session.Session().client(
        "s3",
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(request_checksum_calculation="when_required", max_pool_connections=PLAIN_CONCURRENCY * 2),
    )
    body = os.urandom(mb << 20)  # random, as the padded state: nothing gets a cheaper job
    cfg = TransferConfig(multipart_threshold=PLAIN_PART_MB << 20, multipart_chunksize=PLAIN_PART_MB << 20,
                         max_concurrency=PLAIN_CONCURRENCY, preferred_transfer_client="classic")  # fmt: skip
    key = f"{prefix}/plain.bin".lstrip("/")
    best = float("inf")
    for _ in range(2):
        t0 = time.monotonic()
        client.upload_fileobj(io.BytesIO(body), bucket, key, Config=cfg)
        best = min(best, time.monotonic() - t0)
        client.delete_object(Bucket=bucket, Key=key)
    how = f"boto3 TransferManager from memory, part {PLAIN_PART_MB} MiB, concurrency {PLAIN_CONCURRENCY}, best of 2"
    return best, how


def bench_padded(name: str, make_uri: Callable[[str], str], root: Path, sizes: list[int], repeats: int = 1) -> None:
    from dreambooth_trainer.checkpoint.layout import DEFAULT_WRITERS
    from dreambooth_trainer.storage.s3 import DEFAULT_MAX_CONCURRENCY, DEFAULT_MULTIPART_CHUNKSIZE

    print(f"checkpoint stream settings: {DEFAULT_WRITERS} file writers; S3 parts of "
          f"{DEFAULT_MULTIPART_CHUNKSIZE >> 20} MiB, {DEFAULT_MAX_CONCURRENCY} in flight", flush=True)  # fmt: skip
    points: list[tuple[int, float]] = []
    for mb in sizes:
        # Best of `repeats` trials, as the plain transfer is a best-of: both meet the same noisy disk.
        runs = [trial(root / f"pad-{name}-{mb}-{i}", make_uri(f"pad-{mb}-{i}"), pad_mb=mb, warm_steps=2,
                      ckpt=100_000) for i in range(repeats)]  # fmt: skip
        for i in range(repeats):
            _cleanup(make_uri(f"pad-{mb}-{i}"))
        r = min(runs, key=lambda x: x["durable"])
        points.append((mb, r["durable"]))
        print(f"padded state {mb} MiB (+ tiny model state), {name}: SIGTERM -> durable {r['durable']:.2f} s "
              f"({mb / max(r['durable'], 1e-9):.0f} MiB/s), launcher exit {r['exit']:.2f} s, steps lost "
              f"{int(r['lost'])} (best of {repeats})", flush=True)  # fmt: skip
        plain, how = plain_transfer(make_uri(f"plain-{mb}"), mb)
        print(f"plain transfer of {mb} MiB, {name}: {plain:.2f} s ({mb / max(plain, 1e-9):.0f} MiB/s; {how}); "
              f"checkpoint / plain = {r['durable'] / max(plain, 1e-9):.2f}x (target <= 1.25x)", flush=True)  # fmt: skip
    # Least squares t = a + b * size: a is the fixed cost (finish the step, snapshot, manifest), b the per-MiB cost.
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    var = sum((p[0] - mx) ** 2 for p in points)
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / var if var else my / mx
    a = my - b * mx
    for budget in BUDGETS:
        measured = max((mb for mb, t in points if t <= budget), default=None)
        fit = (budget - a) / b if b > 0 else float("inf")
        print(
            f"largest state durable within {budget:.0f} s, {name}: measured {measured if measured else 'none'} MiB; "
            f"~{fit / 1024:.1f} GiB extrapolated (t = {a:.2f} s + {b * 1024:.2f} s/GiB)",
            flush=True,
        )


def _cleanup(uri: str) -> None:
    from dreambooth_trainer.storage import open_store

    store = open_store(uri)
    if store.local_root() is not None:
        import shutil

        shutil.rmtree(store.local_root(), ignore_errors=True)
        return
    for top in {info.key.split("/", 1)[0] for info in store.list("")}:
        if top.startswith("checkpoint-"):
            store.delete_prefix(f"{top}/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="tiny-model trials per storage")
    parser.add_argument("--sizes-mb", default="256,1024,2048", help="padded state sizes, MiB")
    parser.add_argument("--no-s3", action="store_true", help="skip SeaweedFS")
    parser.add_argument("--no-local", action="store_true", help="skip the local disk")
    parser.add_argument("--s3-sizes-mb", default=None, help="padded sizes on SeaweedFS (default: --sizes-mb)")
    parser.add_argument("--no-padded", action="store_true", help="only the tiny model")
    parser.add_argument("--padded-repeats", type=int, default=1, help="trials per padded size (best is shown)")
    parser.add_argument("--nproc", type=int, default=1, help="world size (2: S3 checkpoints are shared by the ranks)")
    args = parser.parse_args()
    global NPROC
    NPROC = args.nproc
    sizes = [int(x) for x in args.sizes_mb.split(",") if x]
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"world size {NPROC}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-preemption-") as tmp:
        root = Path(tmp)
        if not args.no_local:
            bench_tiny("local disk", lambda n: str(root / "out" / n), root, args.repeats)
            if not args.no_padded:
                bench_padded("local disk", lambda n: str(root / "out" / n), root, sizes, args.padded_repeats)
        if not args.no_s3:
            server = _start_s3(root)
            if server is not None:
                try:
                    bucket = server.make_bucket("bench-preemption")
                    bench_tiny("SeaweedFS S3", lambda n: f"s3://{bucket}/{n}", root, args.repeats)
                    if not args.no_padded:
                        s3_sizes = [int(x) for x in (args.s3_sizes_mb or args.sizes_mb).split(",") if x]
                        bench_padded(
                            "SeaweedFS S3", lambda n: f"s3://{bucket}/{n}", root, s3_sizes, args.padded_repeats
                        )
                finally:
                    server.close()
    return 0


def _start_s3(root: Path):  # noqa: ANN202
    try:
        from s3server import SeaweedS3, find_weed

        find_weed()
    except (ImportError, FileNotFoundError) as exc:
        print(f"SeaweedFS: skipped ({exc})")
        return None
    server = SeaweedS3()
    server.start()
    os.environ.update(server.env())
    os.environ["DREAMBOOTH_CACHE"] = str(root / "cache")
    print(f"SeaweedFS on {server.endpoint} (same machine: measures the protocol and the bytes, not a network)")
    return server


if __name__ == "__main__":
    sys.exit(main())
