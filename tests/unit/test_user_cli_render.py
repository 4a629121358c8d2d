"""The user CLI's pure parts: the `get` table, ages, `watch`'s lines, the gallery page, output URIs."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from PIL import Image

from dreambooth_cli import render
from dreambooth_cli.errors import UserError
from dreambooth_cli.objects import split_s3
from dreambooth_trainer import gallery
from gallery_check import check_gallery  # tests/ is on sys.path (tests/conftest.py)

pytestmark = pytest.mark.unit
NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)


def job(name: str, **status: object) -> dict:
    return {
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": "2026-12-03T11:00:00Z"},
        "spec": {"runPolicy": {"queueName": "gpu-queue"}},
        "status": status,
    }


def test_table_has_kubectls_columns_plus_attempt_restarts_queue() -> None:
    running = job("dog", phase="Running", attempt=2, restarts=1, preemptions=1, step=120, maxSteps=400,
                  loss=0.123456, eta="3m", lastCheckpoint={"step": 100})  # fmt: skip
    fresh = job("cat")
    fresh["spec"] = {}
    text = render.table([render.job_row(running, NOW), render.job_row(fresh, NOW)])
    head, dog, cat = text.splitlines()
    assert head.split() == list(render.COLUMNS)
    assert dog.split() == ["dog", "Running", "2", "1", "1", "gpu-queue", "120", "400", "0.1235", "3m", "100", "60m"]
    assert cat.split() == ["cat", "Pending", "<none>", "0", "0", "<none>", "<none>", "<none>", "<none>", "<none>",
                           "<none>", "60m"]  # fmt: skip
    # Columns line up: every cell starts where its header does.
    for col in ("PHASE", "QUEUE", "AGE"):
        assert dog[head.index(col) - 1] == " " and dog[head.index(col)] != " "
    with_ns = render.table([render.job_row(running, NOW)], with_namespace=True, namespaces=["ml"])
    assert with_ns.splitlines()[0].split()[0] == "NAMESPACE" and with_ns.splitlines()[1].split()[:2] == ["ml", "dog"]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(5, "5s"), (119, "119s"), (192, "3m12s"), (600, "10m"), (42 * 60, "42m"), (5 * 3600 + 180, "5h3m"),
     (20 * 3600, "20h"), (3 * 86400, "3d")],
)  # fmt: skip
def test_age_reads_like_kubectl(seconds: int, shown: str) -> None:
    created = datetime.fromtimestamp(NOW.timestamp() - seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert render.age(created, NOW) == shown
    assert render.age(None, NOW) == "<unknown>"


def test_progress_line_shows_bar_loss_speed_eta_and_checkpoint() -> None:
    line = render.progress_line({"phase": "Running", "step": 50, "maxSteps": 100, "loss": 0.25, "stepsPerSecond": 1.5,
                                 "eta": "33s", "lastCheckpoint": {"step": 40}, "attempt": 2}, width=10)  # fmt: skip
    assert "[#####.....] 50/100" in line
    assert "loss 0.25" in line and "1.50 it/s" in line and "ETA 33s" in line and "checkpoint 40" in line
    assert "attempt 2" in line
    assert render.progress_line({}).startswith("Pending")
    assert "ETA 1h01m" in render.progress_line({"step": 1, "etaSeconds": 3660})


def test_startup_line_once_the_first_step_is_done() -> None:
    assert render.startup_line({"startupSeconds": {"sync": 40.0, "load": None, "total": None}}) is None
    assert render.startup_line({}) is None
    line = render.startup_line({"startupSeconds": {"sync": 41.5, "load": 9.0, "data": 1.25, "firstStep": 2.0,
                                                   "other": 3.0, "total": 96.75}})  # fmt: skip
    assert line == "started in 1m36s: sync 41.5s, load 9.0s, data 1.2s, first step 2.0s, other 3.0s"


def test_phase_and_event_lines_and_new_events() -> None:
    assert render.phase_line(None, {"phase": "Running"}) == "phase Running"
    assert render.phase_line("Running", {"phase": "Failed", "message": "exit 64"}) == "phase Running -> Failed: exit 64"
    e = {"metadata": {"uid": "u1"}, "type": "Warning", "reason": "Preempted", "message": "pod deleted", "count": 1}
    assert render.event_line(e) == "event Warning Preempted: pod deleted"
    # The apiserver aggregates repeats into one Event with a higher count: that is news again.
    assert render.event_key(e) != render.event_key({**e, "count": 2})
    ordered = render.events_sorted([{**e, "lastTimestamp": "2026-01-02T00:00:00Z"},
                                    {**e, "reason": "First", "lastTimestamp": "2026-01-01T00:00:00Z"}])  # fmt: skip
    assert [x["reason"] for x in ordered] == ["First", "Preempted"]


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_gallery_is_self_contained_newest_first_and_escapes_text() -> None:
    steps = {10: [("image-0.png", _png((255, 0, 0)))], 30: [("image-0.png", _png((0, 255, 0))),
                                                            ("image-1.png", _png((0, 0, 255)))]}  # fmt: skip
    page = gallery.render("dog<1>", steps, prompt='a photo of "sks" <dog>', losses={30: 0.5}, now=NOW)
    assert check_gallery(page) == [(30, 2), (10, 1)]
    assert "&lt;dog&gt;" in page and "<dog>" not in page and "dog&lt;1&gt;" in page
    assert "step 30 · loss 0.5" in page and 'src="http' not in page
    assert 'id="empty"' in gallery.render("dog", {}, now=NOW)


def test_output_uri_must_be_s3() -> None:
    assert split_s3("s3://bucket/runs/dog") == ("bucket", "runs/dog/")
    assert split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(UserError, match="not in S3"):
        split_s3("/data/out")
