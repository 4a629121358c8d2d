"""Rank 0's /metrics: the checkpoint's publish time as a Unix timestamp (checkpoint-age alerts) and build info."""

from __future__ import annotations

import urllib.request
from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dreambooth_trainer import __version__
from dreambooth_trainer.progress import Progress, ProgressServer

pytestmark = pytest.mark.integration


def scrape(progress: Progress) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    server = ProgressServer(progress, port=0).start()
    try:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        server.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_last_checkpoint_time_is_a_unix_timestamp_once_there_is_one() -> None:
    progress = Progress(10, enabled=False)
    assert ("dreambooth_last_checkpoint_timestamp_seconds", ()) not in scrape(progress)
    progress.record_publish({"step": 4, "uri": "s3://runs/dog/checkpoint-4", "time": "2026-05-01T12:30:00Z"}, 2.5)
    samples = scrape(progress)
    expected = datetime(2026, 5, 1, 12, 30, tzinfo=UTC).timestamp()
    assert samples[("dreambooth_last_checkpoint_timestamp_seconds", ())] == expected
    assert samples[("dreambooth_last_checkpoint_step", ())] == 4
    # A manifest without a readable time: no sample rather than a wrong one.
    progress.record_publish({"step": 6, "uri": "s3://runs/dog/checkpoint-6", "time": "yesterday"}, None)
    assert ("dreambooth_last_checkpoint_timestamp_seconds", ()) not in scrape(progress)


def test_build_info_names_the_trainer_and_its_version() -> None:
    info = [key for key in scrape(Progress(1, enabled=False)) if key[0] == "dreambooth_build_info"]
    assert len(info) == 1
    labels = dict(info[0][1])
    assert labels["component"] == "trainer" and labels["version"] == __version__ and labels["python"]
