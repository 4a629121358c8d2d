"""LOG_FORMAT=json: every line of the launcher and of a worker is one JSON object with job, namespace, attempt,
rank and step, the figures of the progress line as fields, and the rank log file says the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

WORKER = """
import logging, sys
from pathlib import Path
from typing import Any
from dreambooth_trainer.logs import RankLog, setup_logging
from dreambooth_trainer.progress import Progress
setup_logging(sys.argv[1])
rank_log = RankLog(Path(sys.argv[2]))
log = logging.getLogger("dreambooth_trainer.test")
log.info("before the first step")
p = Progress(4)
for step in (1, 2):
    p.update(step=step, loss=0.5)
    log.warning("at step %d", step)
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("it failed")
p.close()
rank_log.handler.flush()
"""


def run(role: str, tmp_path: Path, **env: str) -> tuple[list[str], Path]:
    local = tmp_path / f"{role}.log"
    full = {**os.environ, "DREAMBOOTH_JOB_NAME": "dog", "DREAMBOOTH_NAMESPACE": "team", "DREAMBOOTH_ATTEMPT": "3",
            "RANK": "1", **env}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", WORKER, role, str(local)], env=full, capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    return done.stderr.splitlines(), local


def test_every_worker_line_is_json_with_who_and_which_step(tmp_path: Path) -> None:
    lines, local = run("worker", tmp_path, LOG_FORMAT="json")
    docs = [json.loads(line) for line in lines]  # every line, or this raises
    assert {d["job"] for d in docs} == {"dog"} and {d["namespace"] for d in docs} == {"team"}
    assert {d["attempt"] for d in docs} == {3} and {d["rank"] for d in docs} == {1}
    by_message = {d["message"]: d for d in docs}
    assert by_message["before the first step"]["step"] is None
    assert by_message["at step 2"]["step"] == 2 and by_message["at step 2"]["level"] == "WARNING"
    assert "RuntimeError: boom" in by_message["it failed"]["exc_info"]
    progress = [d for d in docs if d["message"].startswith("step 2/4")]
    assert progress and progress[-1]["loss"] == 0.5 and progress[-1]["max_steps"] == 4
    # The per-rank log uploaded to the output store carries the same fields.
    filed = [json.loads(line) for line in local.read_text().splitlines()]
    assert [d["message"] for d in filed] == [d["message"] for d in docs]
    assert all(d["job"] == "dog" and d["rank"] == 1 for d in filed)


def test_the_launcher_is_no_rank_and_text_stays_the_default(tmp_path: Path) -> None:
    lines, _ = run("launcher", tmp_path, LOG_FORMAT="json")
    docs = [json.loads(line) for line in lines]
    assert {d["role"] for d in docs} == {"launcher"} and {d["rank"] for d in docs} == {None}
    text, _ = run("worker", tmp_path / "text", LOG_FORMAT="")
    assert any("WARNING dreambooth_trainer.test: at step 1" in line for line in text)


def test_an_unknown_format_logs_text_and_says_the_fix(tmp_path: Path) -> None:
    lines, _ = run("worker", tmp_path, LOG_FORMAT="xml")
    assert "LOG_FORMAT='xml' is not a log format: set it to text or json" in lines[0]
    assert any("at step 2" in line and not line.startswith("{") for line in lines)


def test_an_extra_json_cannot_take_is_written_not_lost() -> None:
    """kopf's object loggers pass their settings object (uncopyable) as an extra: the line is still written."""
    import dataclasses
    import io
    import logging
    import threading

    from dreambooth_api.logformat import json_handler

    @dataclasses.dataclass
    class Settings:
        lock: Any = dataclasses.field(default_factory=threading.Lock)  # asdict's deepcopy of it raises

    out = io.StringIO()
    log = logging.getLogger("dreambooth_test.extras")
    log.propagate = False
    log.addHandler(json_handler({"component": "operator"}, stream=out))
    log.warning("handled", extra={"settings": Settings(), "k8s_skip": False, "k8s_ref": {"name": "dog"},
                                  "odd": Settings()})  # fmt: skip
    doc = json.loads(out.getvalue())
    assert doc["message"] == "handled" and doc["k8s_ref"] == {"name": "dog"} and doc["component"] == "operator"
    assert "settings" not in doc and "k8s_skip" not in doc and "lock" in doc["odd"]
