"""Upload and download throughput of one N MiB file against S3: our Store vs boto3's defaults vs the AWS CLI.

Starts a SeaweedFS server on 127.0.0.1 (tests/s3server.py) unless --endpoint points at a running one (then the
usual AWS_* variables must hold its credentials). Prints one line per case:

    .venv/bin/python benchmarks/s3_transfer.py --size-mb 256 --repeat 3

The file is random bytes, hot in the page cache, so the figures measure the client and the server, not disks.
On a single host the S3 server competes with the client for CPU: read the numbers as a comparison between
clients on the same bytes, not as what a cluster's object store delivers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "trainer_image"))

MiB = 1024 * 1024


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def _server(endpoint: str | None) -> Iterator[dict[str, str]]:
    if endpoint:
        yield {"AWS_ENDPOINT_URL": endpoint}
        return
    from s3server import SeaweedS3

    with SeaweedS3() as server:
        yield server.env()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=256, help="file size in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported (default 3)")
    ap.add_argument("--endpoint", help="use this S3 endpoint instead of starting SeaweedFS")
    ap.add_argument(
        "--store-chunks",
        default="",
        help="extra Store cases with these multipart chunk sizes in MiB, comma-separated (e.g. 8,64)",
    )
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="s3bench-"))
    try:
        src = work / "payload.bin"
        with open(src, "wb") as fh:
            for _ in range(args.size_mb):
                fh.write(os.urandom(MiB))
        digest = _sha256(src)
        size_mib = src.stat().st_size / MiB

        with _server(args.endpoint) as env:
            os.environ.update(env)
            import boto3
            from botocore.config import Config

            from dreambooth_trainer.storage import open_store
            from dreambooth_trainer.storage.s3 import DEFAULT_MULTIPART_CHUNKSIZE

            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            plain = boto3.session.Session().client(
                "s3",
                # The only non-defaults: what any client needs to talk to an S3-compatible server at all.
                config=Config(
                    s3={"addressing_style": os.environ.get("DREAMBOOTH_S3_ADDRESSING_STYLE", "auto")},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
            )
            plain.create_bucket(Bucket=bucket)

            cases: list[tuple[str, Callable[[], Any], Callable[[Path], Any]]] = []
            store = open_store(f"s3://{bucket}/store")
            cases.append(
                (
                    f"Store (defaults: {DEFAULT_MULTIPART_CHUNKSIZE // MiB} MiB parts, 10 threads)",
                    lambda: store.upload_file(src, "payload.bin"),
                    lambda dest: store.download_file("payload.bin", dest),
                )
            )
            for chunk in [int(c) for c in args.store_chunks.split(",") if c.strip()]:
                tuned = open_store(
                    f"s3://{bucket}/store-{chunk}", multipart_threshold=chunk * MiB, multipart_chunksize=chunk * MiB
                )
                cases.append(
                    (
                        f"Store ({chunk} MiB parts, 10 threads)",
                        lambda tuned=tuned: tuned.upload_file(src, "payload.bin"),
                        lambda dest, tuned=tuned: tuned.download_file("payload.bin", dest),
                    )
                )
            cases.append(
                (
                    "boto3 upload_file/download_file (defaults)",
                    lambda: plain.upload_file(str(src), bucket, "boto3/payload.bin"),
                    lambda dest: plain.download_file(bucket, "boto3/payload.bin", str(dest)),
                )
            )
            aws = shutil.which("aws")
            if aws is None:
                skipped = "AWS CLI: skipped (no `aws` on PATH; pip install awscli to compare)"
            else:
                skipped = ""
                cfg = work / "aws-config"
                style = os.environ.get("DREAMBOOTH_S3_ADDRESSING_STYLE", "auto")
                region = os.environ.get("AWS_REGION", "us-east-1")
                cfg.write_text(f"[default]\nregion = {region}\ns3 =\n  addressing_style = {style}\n")
                cli_env = {**os.environ, "AWS_CONFIG_FILE": str(cfg)}
                version = subprocess.run([aws, "--version"], env=cli_env, capture_output=True, text=True)
                label = (version.stdout or version.stderr).split()[0] if version.returncode == 0 else "aws"

                def cli(*cmd: str) -> None:
                    subprocess.run([aws, "s3", "cp", "--only-show-errors", *cmd], env=cli_env, check=True)

                cases.append(
                    (
                        f"AWS CLI s3 cp ({label}, defaults)",
                        lambda: cli(str(src), f"s3://{bucket}/cli/payload.bin"),
                        lambda dest: cli(f"s3://{bucket}/cli/payload.bin", str(dest)),
                    )
                )

            dest = work / "down.bin"

            def download(case: tuple[str, Callable[[], Any], Callable[[Path], Any]]) -> None:
                dest.unlink(missing_ok=True)
                case[2](dest)

            # One untimed round first (the first write to a bucket makes SeaweedFS grow volumes), then rounds that
            # interleave the cases so that load from other processes on the host hits them all alike.
            for case in cases:
                case[1]()
                download(case)
                if _sha256(dest) != digest:
                    raise SystemExit(f"{case[0]}: downloaded bytes differ from the upload")
            up_times: dict[str, list[float]] = {c[0]: [] for c in cases}
            down_times: dict[str, list[float]] = {c[0]: [] for c in cases}
            for _ in range(args.repeat):
                for case in cases:
                    up_times[case[0]].append(_timed(case[1]))
                    down_times[case[0]].append(_timed(lambda case=case: download(case)))

            print(f"# {size_mib:.0f} MiB, median of {args.repeat}, endpoint {os.environ['AWS_ENDPOINT_URL']}")
            for name, _, _ in cases:
                t_up, t_down = statistics.median(up_times[name]), statistics.median(down_times[name])
                print(
                    f"{name:<42} upload {size_mib / t_up:8.1f} MiB/s ({t_up:6.2f} s)   "
                    f"download {size_mib / t_down:8.1f} MiB/s ({t_down:6.2f} s)",
                    flush=True,
                )
            if skipped:
                print(skipped)

            with contextlib.suppress(Exception):
                for page in plain.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    for obj in page.get("Contents", []):
                        plain.delete_object(Bucket=bucket, Key=obj["Key"])
                plain.delete_bucket(Bucket=bucket)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
