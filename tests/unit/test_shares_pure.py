"""Checkpoint shares, the pure parts: which rank uploads which part, which files are shared, and how rank 0 merges
and checks the other ranks' reports before it completes an upload (checkpoint/shares.py)."""

from __future__ import annotations

import pytest

from dreambooth_trainer.checkpoint import shares
from dreambooth_trainer.checkpoint.shares import ShareError

pytestmark = pytest.mark.unit

P = 16  # a part size, in bytes, for the tables


@pytest.mark.parametrize(
    ("size", "world", "rank", "parts"),
    [
        (64, 2, 0, [1, 3]),  # 4 full parts, alternating
        (64, 2, 1, [2, 4]),
        (65, 2, 0, [1, 3, 5]),  # a short fifth part: rank 0's
        (65, 2, 1, [2, 4]),
        (16, 2, 0, [1]),  # one part: rank 0 alone, rank 1 nothing
        (16, 2, 1, []),
        (100, 3, 0, [1, 4, 7]),  # 7 parts over 3 ranks
        (100, 3, 1, [2, 5]),
        (100, 3, 2, [3, 6]),
        (5, 4, 0, [1]),  # under one part: still one part (a file chosen by its tensors' size may serialise smaller)
    ],
)
def test_part_k_is_uploaded_by_rank_k_mod_world(size: int, world: int, rank: int, parts: list[int]) -> None:
    assert shares.parts_of(rank, size, P, world) == parts
    assert all(shares.owner(n, world) == rank for n in parts)


def test_the_parts_cover_every_byte_once() -> None:
    for size in (1, 15, 16, 17, 64, 100, 1000):
        count = shares.part_count(size, P)
        assert sum(shares.part_bytes(n, size, P) for n in range(1, count + 1)) == size
        assert all(0 < shares.part_bytes(n, size, P) <= P for n in range(1, count + 1))
        everyone = sorted(n for r in range(3) for n in shares.parts_of(r, size, P, 3))
        assert everyone == list(range(1, count + 1))


def test_only_files_of_at_least_one_part_are_shared() -> None:
    sizes = {"unet/diffusion_pytorch_model.safetensors": 40, "training/optimizer.pt": 16, "training/scheduler.pt": 0,
             "training/test-padding.safetensors": 15}  # fmt: skip
    assert shares.shared_files(sizes, P) == ["training/optimizer.pt", "unet/diffusion_pytorch_model.safetensors"]
    assert shares.shared_files({}, P) == []


def _mine(size: int = 64, sha: str = "a" * 64, world: int = 2) -> dict:
    return {"f": {"size": size, "sha256": sha, "parts": {n: f"e{n}" for n in shares.parts_of(0, size, P, world)}}}


def _report(rank: int, size: int = 64, sha: str = "a" * 64, world: int = 2, **extra) -> dict:  # noqa: ANN003
    parts = {str(n): f"e{n}" for n in shares.parts_of(rank, size, P, world)}
    return {"id": "run", "rank": rank, "files": {"f": {"size": size, "sha256": sha, "parts": parts}}, **extra}


def test_reports_merge_into_every_part_of_every_file() -> None:
    merged = shares.merge_reports(_mine(), {1: _report(1)}, 2, P)
    assert merged == {"f": {1: "e1", 2: "e2", 3: "e3", 4: "e4"}}
    three = shares.merge_reports(_mine(100, world=3), {1: _report(1, 100, world=3), 2: _report(2, 100, world=3)}, 3, P)
    assert sorted(three["f"]) == list(range(1, 8))


@pytest.mark.parametrize(
    ("reports", "error"),
    [
        ({}, "rank 1 sent no report in time"),
        ({1: {"id": "run", "rank": 1, "error": "S3 down"}}, "rank 1 failed: S3 down"),
        ({1: _report(1, sha="b" * 64)}, "the replicas differ: f is 64 bytes, sha256 bbbb"),
        ({1: _report(1, size=65)}, "the replicas differ: f is 65 bytes"),
        ({1: {"id": "run", "rank": 1, "files": {}}}, "rank 1 reported nothing of f"),
        ({1: {**_report(1), "files": {"f": {**_report(1)["files"]["f"], "parts": {"2": "e2"}}}}},
         r"rank 1 uploaded parts \[2\], not its share"),
    ],
)  # fmt: skip
def test_a_missing_failed_or_different_share_is_refused(reports: dict, error: str) -> None:
    with pytest.raises(ShareError, match=error):
        shares.merge_reports(_mine(), reports, 2, P)


def test_the_log_line_says_what_each_rank_uploaded() -> None:
    per = shares.per_rank({"a": 64, "b": 20}, P, 2, alone_bytes=10)
    # a: parts 1,3 (rank 0) and 2,4 (rank 1); b: part 1 (16, rank 0) and part 2 (4, rank 1); 10 alone on rank 0
    assert per == [(3, 16 + 16 + 16 + 10), (3, 16 + 16 + 4)]
    line = shares.summary("checkpoint-4", [(2, 3 << 20), (2, 1 << 20)])
    assert line == "checkpoint-4 shares: rank 0 2 parts 3.0 MiB (75%), rank 1 2 parts 1.0 MiB (25%)"


@pytest.mark.parametrize(
    ("value", "mode"), [("", "node"), ("on", "node"), ("Node", "node"), ("rank", "rank"), ("OFF", "off")]
)
def test_shares_are_per_node_by_default_and_can_be_per_rank_or_off(value: str, mode: str) -> None:
    assert shares.mode({shares.ENV: value}) == mode


def test_a_bad_switch_names_the_variable_and_its_values() -> None:
    with pytest.raises(ValueError, match="DREAMBOOTH_CHECKPOINT_SHARES='no': use node"):
        shares.mode({shares.ENV: "no"})


@pytest.mark.parametrize(
    ("mode", "rank", "world", "local_world", "expected"),
    [
        # One node of 8 GPUs: its ranks share one NIC, so rank 0 uploads alone (no share overhead).
        ("node", 0, 8, 8, (0, 1)),
        ("node", 3, 8, 8, (None, 1)),
        # Two nodes of 8: the first rank of each node uploads half.
        ("node", 0, 16, 8, (0, 2)),
        ("node", 8, 16, 8, (1, 2)),
        ("node", 9, 16, 8, (None, 2)),
        # Two nodes of one rank each (the operator's CPU gang).
        ("node", 1, 2, 1, (1, 2)),
        # Every rank uploads (a NIC per GPU; several ranks on one test host).
        ("rank", 3, 8, 8, (3, 8)),
        ("off", 0, 16, 8, (0, 1)),
        ("off", 8, 16, 8, (None, 1)),
        ("node", 0, 1, 1, (0, 1)),
        # Ranks not laid out node by node: rank 0 alone, as before shares.
        ("node", 0, 6, 4, (0, 1)),
        ("node", 5, 6, 4, (None, 1)),
    ],
)
def test_who_uploads_a_share(mode: str, rank: int, world: int, local_world: int, expected: tuple) -> None:
    assert shares.participant(mode, rank, world, local_world) == expected
