"""--push_to_hub up to the API boundary: a real HTTP server on 127.0.0.1 speaks the few Hub endpoints that
huggingface_hub's create_repo and upload_folder call, and records what the trainer sent (there is no Hub here)."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tests.trainer_utils import run_dreambooth, tiny_args, trainer_env

pytestmark = pytest.mark.integration


class HubStub:
    """Records requests; `refuse` makes every call answer 401 as the Hub does for a bad token."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                stub.requests.append(("GET", self.path, dict(self.headers), b""))
                self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.requests.append(("POST", self.path, dict(self.headers), body))
                if stub.refuse:
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                elif self.path == "/api/repos/create":
                    doc = json.loads(body)
                    self._reply(200, {"url": f"{stub.endpoint}/{doc['organization']}/{doc['name']}"})
                elif self.path == "/api/validate-yaml":
                    self._reply(200, {})
                elif "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    # Every file as a regular (inline) upload: no LFS or Xet storage to stub.
                    self._reply(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                elif "/commit/" in self.path:
                    # huggingface_hub parses the repo out of the commit URL: it must be <endpoint>/<repo>/commit/<oid>.
                    repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
                    url = f"{stub.endpoint}/{repo}/commit/{'1' * 40}"
                    self._reply(200, {"commitUrl": url, "commitOid": "1" * 40, "pullRequestUrl": None})
                else:
                    self._reply(404, {"error": "not found"})

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, fragment: str) -> list[tuple[str, str, dict[str, str], bytes]]:
        return [r for r in self.requests if r[0] == "POST" and fragment in r[1]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub() -> Iterator[HubStub]:
    stub = HubStub()
    yield stub
    stub.close()


def _env(stub: HubStub, **extra: str) -> dict[str, str]:
    # HF_HOME keeps a developer's saved token and cache out of it; the token comes from HF_TOKEN.
    return trainer_env(HF_ENDPOINT=stub.endpoint, HF_TOKEN="hf_from_env", HF_HUB_DISABLE_TELEMETRY="1",
                       HF_HOME=str(Path(extra.pop("home"))), PROGRESS_PORT="off", **extra)  # fmt: skip


def test_push_to_hub_creates_the_repo_first_and_uploads_the_output_without_checkpoints(tmp_path: Path, hub) -> None:
    out = tmp_path / "sks-dog"
    proc = run_dreambooth(
        ["train-lora", *tiny_args(out, steps=2, ckpt=1, batch=1, extra=[
            "--push_to_hub", "--hub_model_id", "me/sks-dog", "--validation_prompt", "a photo of sks dog",
            "--num_validation_images", "1", "--report_to", "none"])],
        env=_env(hub, home=str(tmp_path / "hf")),
    )  # fmt: skip
    create = hub.posts("/api/repos/create")
    assert len(create) == 1 and json.loads(create[0][3]) == {"name": "sks-dog", "organization": "me"}
    assert {k.lower(): v for k, v in create[0][2].items()}["authorization"] == "Bearer hf_from_env"
    assert hub.requests.index(create[0]) < hub.requests.index(hub.posts("/preupload/")[0])
    (commit,) = hub.posts("/api/models/me/sks-dog/commit/main")
    lines = [json.loads(line) for line in commit[3].decode().splitlines()]
    assert lines[0] == {"key": "header", "value": {"summary": "End of training", "description": ""}}
    files = {d["value"]["path"]: d["value"] for d in lines[1:] if d["key"] == "file"}
    assert {"README.md", "pytorch_lora_weights.safetensors", "validation/step-2/image-0.png"} <= set(files)
    assert not [p for p in files if p.startswith(("checkpoint-", "LATEST", ".owner"))], sorted(files)
    assert (out / "checkpoint-1").is_dir()  # it exists locally, it just is not a model file
    readme = base64.b64decode(files["README.md"]["content"]).decode()
    assert readme == (out / "README.md").read_text() and "# LoRA DreamBooth - me/sks-dog" in readme
    assert "prefer the HF_TOKEN" not in proc.stderr


def test_a_refused_token_fails_before_training_and_hub_token_is_discouraged(tmp_path: Path) -> None:
    stub = HubStub(refuse=True)
    try:
        out = tmp_path / "out"
        proc = run_dreambooth(
            ["train", *tiny_args(out, steps=2, ckpt=100, batch=1, extra=["--push_to_hub", "--hub_token", "hf_bad"])],
            env=_env(stub, home=str(tmp_path / "hf")), check=False,
        )  # fmt: skip
    finally:
        stub.close()
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert (
        "--hub_token (spec.training.hubToken): the Hub refused to create the repository out (HTTP 401)" in proc.stderr
    )
    assert "set HF_TOKEN" in proc.stderr and "prefer the HF_TOKEN environment variable" in proc.stderr
    assert "[dreambooth] step" not in proc.stderr and "Loading weights" not in proc.stderr
    (create,) = stub.posts("/api/repos/create")
    assert {k.lower(): v for k, v in create[2].items()}["authorization"] == "Bearer hf_bad"


def test_an_unreachable_hub_fails_before_training_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    env = trainer_env(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_TOKEN="hf_from_env", HF_HUB_DISABLE_TELEMETRY="1",
                      HF_HOME=str(tmp_path / "hf"), PROGRESS_PORT="off")  # fmt: skip
    proc = run_dreambooth(
        ["train-lora", *tiny_args(out, steps=2, ckpt=100, batch=1, extra=["--push_to_hub"])], env=env, check=False
    )
    # Not bad input (the Hub may be back on the next attempt), but explained: no traceback to read through.
    assert proc.returncode == 70, proc.stderr[-3000:]
    assert f"error: could not create the repository out on http://127.0.0.1:{port}: ConnectError" in proc.stderr
    assert "Traceback" not in proc.stderr and "[dreambooth] step" not in proc.stderr
