"""A job's output in S3, read the way the user's terminal can: the standard AWS credential chain, the job's endpoint.

`download` verifies every file it writes: a checkpoint against its manifest.json (size and sha256 per file,
docs/design.md section 5), the final model against the sha256 each object carries as metadata (the trainer
uploads it with every verified file; a multipart ETag is not a content hash). A mismatch removes the file and
fails naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_api.runtime import effective_of

from .errors import UserError

SHA256_METADATA = "sha256"  # the trainer's storage.localfs.SHA256_METADATA (x-amz-meta-sha256)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)/$")
# Under an output prefix, what is not the final model: run state, checkpoints, logs, validation images.
NOT_MODEL = ("checkpoint-", "logs/", "validation/", ".owner", ".lock", "LATEST")


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise UserError(f"the job's output {uri!r} is not in S3 (s3://bucket/prefix/): read it where it is")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


@dataclass
class Output:
    """One job's output prefix: ``s3://bucket/prefix/``."""

    client: Any
    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        import botocore.exceptions as bex

        try:
            return fn(**kwargs)
        except bex.NoCredentialsError:
            raise UserError(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), the keys of "
                "the job's storage.credentialsSecret"
            ) from None
        except bex.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise UserError(f"{what}: not found at {self.uri}") from None
            if code == "NoSuchBucket":
                raise UserError(f"bucket {self.bucket} does not exist (the job's output {self.uri} is gone)") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise UserError(f"S3 refused {what} ({code}): check the credentials for {self.uri}") from None
            raise UserError(f"{what}: S3 error {code}: {e}") from None
        except bex.EndpointConnectionError as e:
            raise UserError(f"cannot reach S3 at {e.kwargs.get('endpoint_url')}: pass --s3-endpoint URL") from None
        except bex.BotoCoreError as e:
            raise UserError(f"{what}: {e}") from None

    def list_keys(self, under: str = "") -> list[str]:
        """Every key below ``prefix + under``, relative to the prefix."""
        out: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + under}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(f"listing {under or 'the output'}", self.client.list_objects_v2, **kwargs)
            out += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def read(self, key: str) -> bytes:
        return self._call(key, self.client.get_object, Bucket=self.bucket, Key=self.prefix + key)["Body"].read()

    def stream(self, key: str) -> Iterator[bytes]:
        body = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self.prefix + key)["Body"]
        yield from body.iter_chunks(1 << 20)

    def head(self, key: str) -> dict[str, Any]:
        return self._call(key, self.client.head_object, Bucket=self.bucket, Key=self.prefix + key)

    def presign(self, key: str, expires: int = 3600) -> str:
        return self._call(key, self.client.generate_presigned_url, ClientMethod="get_object",
                          Params={"Bucket": self.bucket, "Key": self.prefix + key}, ExpiresIn=expires)  # fmt: skip

    # ----------------------------------------------------------------- what the output holds
    def checkpoints(self) -> list[int]:
        steps = set()
        for key in self.list_keys():
            m = re.match(r"^checkpoint-(\d+)/manifest\.json$", key)
            if m:
                steps.add(int(m.group(1)))
        return sorted(steps)

    def latest_checkpoint(self) -> int:
        try:
            name = self.read("LATEST").decode().strip()
        except UserError:
            raise UserError(f"no checkpoint yet at {self.uri} (LATEST is missing)") from None
        return int(name.removeprefix("checkpoint-"))


def output_for(job: dict[str, Any], endpoint: str | None = None) -> Output:
    """The job's output prefix with a client for the job's endpoint (``endpoint`` overrides it)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise UserError("boto3 is missing: pip install 'dreambooth-operator[cli]'") from None
    spec = effective_of(job)  # the storage may be its runtime's
    uri = (job.get("status") or {}).get("outputUri") or (spec.get("training") or {}).get("outputDir") or ""
    bucket, prefix = split_s3(uri)
    storage = spec.get("storage") or {}
    url = endpoint or storage.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or None
    style = "path" if storage.get("pathStyle") else os.environ.get("DREAMBOOTH_S3_ADDRESSING_STYLE", "auto")
    region = storage.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    client = boto3.client("s3", endpoint_url=url, region_name=region or "us-east-1",
                          config=Config(s3={"addressing_style": style}, retries={"max_attempts": 3}, signature_version="s3v4"))  # fmt: skip
    return Output(client, bucket, prefix)


# ----------------------------------------------------------------------------------------------- download
def _fetch_verified(out: Output, key: str, dest: Path, size: int | None, sha256: str | None) -> None:
    """Stream one object to dest, hashing it; a file that does not match is removed and named."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    h = hashlib.sha256()
    n = 0
    with open(tmp, "wb") as f:
        for chunk in out.stream(key):
            h.update(chunk)
            n += len(chunk)
            f.write(chunk)
    got = h.hexdigest()
    wrong = []
    if size is not None and n != size:
        wrong.append(f"size {n}, published {size}")
    if sha256 is not None and got != sha256:
        wrong.append(f"sha256 {got[:16]}…, published {sha256[:16]}…")
    if wrong:
        tmp.unlink()
        raise UserError(
            f"{out.uri}{key} does not match what was published ({'; '.join(wrong)}): the object changed after it "
            "was written; the file was not kept"
        )
    os.replace(tmp, dest)


def download_checkpoint(out: Output, step: int, dest: Path) -> list[str]:
    folder = f"checkpoint-{step}/"
    try:
        manifest = json.loads(out.read(folder + "manifest.json"))
    except UserError:
        have = ", ".join(str(s) for s in out.checkpoints()) or "none"
        raise UserError(f"no checkpoint {step} at {out.uri} (complete checkpoints: {have})") from None
    files = manifest.get("files") or {}
    for rel, meta in sorted(files.items()):
        _fetch_verified(out, folder + rel, dest / rel, meta.get("size"), meta.get("sha256"))
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return sorted(files)


def final_model_keys(out: Output) -> list[str]:
    return [k for k in out.list_keys() if not k.endswith("/") and not k.startswith(NOT_MODEL)]


def download_final(out: Output, dest: Path, phase: str | None) -> list[str]:
    keys = final_model_keys(out)
    if not keys:
        hint = (
            "" if phase == "Succeeded" else f" (the job is {phase or 'Pending'}; --checkpoint N fetches a checkpoint)"
        )
        raise UserError(f"no final model at {out.uri}{hint}")
    planned = []
    for key in keys:
        meta = out.head(key)
        sha = (meta.get("Metadata") or {}).get(SHA256_METADATA)
        if not sha:
            raise UserError(
                f"{out.uri}{key} carries no sha256 (x-amz-meta-sha256): it was not written by the trainer's "
                "verified final save, so it cannot be verified"
            )
        planned.append((key, int(meta["ContentLength"]), sha))
    for key, size, sha in planned:
        _fetch_verified(out, key, dest / key, size, sha)
    return keys


# ----------------------------------------------------------------------------------------------- validation
def validation_images(out: Output) -> dict[int, list[str]]:
    """step -> image keys (in image order), from ``validation/step-N/image-I.png``."""
    from dreambooth_trainer.gallery import group

    return group(out.list_keys("validation/"))
