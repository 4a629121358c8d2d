"""Each data-parallel rank uploads its share of an `s3://` checkpoint (docs/design.md, "Publishing").

The state is replicated on every rank (DDP) and its serialisation is deterministic (same tensors, same bytes), so
every rank serialises and hashes every large file alike and uploads only its parts: part k of a file (0-based,
PartNumber k + 1) is rank k % W's. The format is unchanged: the same files, bytes and manifest as rank 0 alone
writes. The ranks coordinate through small JSON objects of ours beside the checkpoints, never through
collectives (the uploads run on background threads):

    <out>/.shares/checkpoint-N/uploads.json   rank 0: {"id", "partSize", "uploads": {file: upload id}}
                                              (or {"id", "abandoned": true}: rank 0 gave up, do not upload)
    <out>/.shares/checkpoint-N/rank-R.json    rank R > 0: {"id", "rank", "files": {file: {size, sha256,
                                              parts: {PartNumber: ETag}}}} (or {"id", "rank", "error"})

`id` is the run's id (agreed by all ranks at start), so nothing left by an earlier run is ever taken for this
run's. Rank 0 completes every upload only when every rank's size and sha256 of every file equal its own.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ..storage import NotFoundError, Store

SHARES = ".shares"
UPLOADS = "uploads.json"
ENV = "DREAMBOOTH_CHECKPOINT_SHARES"
TIMEOUT_ENV = "DREAMBOOTH_CHECKPOINT_SHARE_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_SECONDS = 600.0
POLL_SECONDS = 0.1


class ShareError(Exception):
    """The ranks' shares cannot make the checkpoint: rank 0 aborts them and uploads the whole checkpoint."""


MODES = ("node", "rank", "off")


def mode(environ: Any = None) -> str:
    """DREAMBOOTH_CHECKPOINT_SHARES: `node` (the default; `on` too) = one rank per node uploads, so N nodes use N
    NICs and the ranks of one node, which share its NIC, add no work; `rank` = every rank uploads (a node with a
    NIC per GPU, or tests of several ranks on one host); `off` = rank 0 uploads every checkpoint alone."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    value = {"": "node", "on": "node"}.get(value, value)
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: use node (the default), rank or off")
    return value


def participant(share_mode: str, rank: int, world: int, local_world: int) -> tuple[int | None, int]:
    """(this process's share index, or None when it uploads nothing; how many share the upload). Index 0 is
    global rank 0, which publishes. torchrun numbers the ranks node by node, `local_world` per node."""
    if share_mode == "off" or world <= 1:
        return (0 if rank == 0 else None), 1
    if share_mode == "rank":
        return rank, world
    if local_world <= 0 or world % local_world:
        return (0 if rank == 0 else None), 1  # ranks not laid out node by node: rank 0 alone, as before shares
    return (rank // local_world if rank % local_world == 0 else None), world // local_world


def timeout_seconds(environ: Any = None) -> float:
    raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV, "").strip()
    return float(raw) if raw else DEFAULT_TIMEOUT_SECONDS


def folder(name: str) -> str:
    return f"{SHARES}/{name}"


def part_count(size: int, part_size: int) -> int:
    return max(1, -(-size // part_size))


def part_bytes(number: int, size: int, part_size: int) -> int:
    """Bytes of PartNumber `number` (1-based) of a file of `size`."""
    return max(0, min(size, number * part_size) - (number - 1) * part_size)


def owner(number: int, world: int) -> int:
    """The rank that uploads PartNumber `number` (1-based)."""
    return (number - 1) % world


def parts_of(rank: int, size: int, part_size: int, world: int) -> list[int]:
    """The PartNumbers rank `rank` uploads."""
    return [n for n in range(1, part_count(size, part_size) + 1) if owner(n, world) == rank]


def shared_files(approx_sizes: dict[str, int], part_size: int) -> list[str]:
    """The files shared out: those whose tensors alone fill a part (every rank computes the same list from its
    equal snapshot; the serialised file is at least that big). Smaller ones are rank 0's, one PUT each."""
    return sorted(rel for rel, size in approx_sizes.items() if size >= part_size)


def merge_reports(
    mine: dict[str, dict[str, Any]], reports: dict[int, dict[str, Any]], world: int, part_size: int
) -> dict[str, dict[int, str]]:
    """Every shared file's PartNumber -> ETag, from rank 0's own entries (`mine`: file -> {size, sha256, parts})
    and the other ranks' reports; ShareError when a rank is missing or failed, or when its bytes differ."""
    for rank in range(1, world):
        report = reports.get(rank)
        if report is None:
            raise ShareError(f"rank {rank} sent no report in time")
        if "error" in report:
            raise ShareError(f"rank {rank} failed: {str(report['error'])[:300]}")
    merged: dict[str, dict[int, str]] = {}
    for rel, meta in mine.items():
        size = meta["size"]
        parts = {int(n): etag for n, etag in meta["parts"].items()}
        if set(parts) != set(parts_of(0, size, part_size, world)):
            raise ShareError(f"{rel}: rank 0 uploaded parts {sorted(parts)}, not its share")
        for rank in range(1, world):
            theirs = reports[rank].get("files", {}).get(rel)
            if theirs is None:
                raise ShareError(f"rank {rank} reported nothing of {rel}")
            if theirs.get("size") != size or theirs.get("sha256") != meta["sha256"]:
                raise ShareError(
                    f"the replicas differ: {rel} is {theirs.get('size')} bytes, sha256 {theirs.get('sha256')} on "
                    f"rank {rank} but {size} bytes, sha256 {meta['sha256']} on rank 0"
                )
            got = {int(n): str(etag) for n, etag in theirs.get("parts", {}).items()}
            if set(got) != set(parts_of(rank, size, part_size, world)):
                raise ShareError(f"{rel}: rank {rank} uploaded parts {sorted(got)}, not its share")
            parts.update(got)
        merged[rel] = parts
    return merged


def per_rank(sizes: dict[str, int], part_size: int, world: int, alone_bytes: int = 0) -> list[tuple[int, int]]:
    """(parts, bytes) each rank uploaded: the shared files' parts, plus rank 0's files under a part."""
    out = [[0, 0] for _ in range(world)]
    for size in sizes.values():
        for n in range(1, part_count(size, part_size) + 1):
            r = owner(n, world)
            out[r][0] += 1
            out[r][1] += part_bytes(n, size, part_size)
    out[0][1] += alone_bytes
    return [(p, b) for p, b in out]


def summary(name: str, per: list[tuple[int, int]]) -> str:
    """The log line of a shared checkpoint (tests and benchmarks read it)."""
    total = sum(b for _, b in per) or 1
    ranks = ", ".join(
        f"rank {r} {p} parts {b / 2**20:.1f} MiB ({100 * b / total:.0f}%)" for r, (p, b) in enumerate(per)
    )
    return f"{name} shares: {ranks}"


# -- the coordination objects ----------------------------------------------------------------------------------


def write_doc(store: Store, key: str, doc: dict[str, Any]) -> None:
    store.write_bytes(key, json.dumps(doc).encode())


def _read_doc(store: Store, key: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(store.read_bytes(key))
    except NotFoundError:
        return None
    except ValueError:
        return None  # being overwritten, or not ours: the poll goes on
    return doc if isinstance(doc, dict) else None


def wait_for_uploads(store: Store, name: str, share_id: str, deadline: float) -> dict[str, Any] | None:
    """Rank 0's uploads.json of this run; None when rank 0 abandoned the shares; ShareError at the deadline."""
    key = f"{folder(name)}/{UPLOADS}"
    while True:
        doc = _read_doc(store, key)
        if doc is not None and doc.get("id") == share_id:
            return None if doc.get("abandoned") else doc
        if time.monotonic() >= deadline:
            raise ShareError(f"rank 0 did not start the shared uploads of {name} in time")
        time.sleep(POLL_SECONDS)


def wait_for_reports(store: Store, name: str, share_id: str, world: int, deadline: float) -> dict[int, dict[str, Any]]:
    """The other ranks' reports of this run, as many as came by the deadline (or until one reports a failure)."""
    reports: dict[int, dict[str, Any]] = {}
    prefix = folder(name)
    while True:
        present = {info.key.rsplit("/", 1)[-1] for info in store.list(prefix)}
        for rank in range(1, world):
            if rank not in reports and f"rank-{rank}.json" in present:
                doc = _read_doc(store, f"{prefix}/rank-{rank}.json")
                if doc is not None and doc.get("id") == share_id:
                    reports[rank] = doc
        if len(reports) == world - 1 or any("error" in r for r in reports.values()):
            return reports
        if time.monotonic() >= deadline:
            return reports
        time.sleep(POLL_SECONDS)
