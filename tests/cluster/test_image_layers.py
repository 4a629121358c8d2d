"""The kubelet's image unpacking: layers applied in order, whiteouts honoured, nothing written outside the image.

Hand-made layer tarballs (what buildah/docker push: gzip tar, `.wh.` files), no cluster needed.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from k8s_harness.images import PullError, Reference, apply_layer, container_argv, resolve_user

pytestmark = pytest.mark.cluster


def layer(path: Path, entries: dict[str, bytes | str | None]) -> Path:
    """A gzip layer: bytes → file, "->target" → symlink, None → folder."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data.removeprefix("->")
                tar.addfile(info)
            else:
                info.size, info.mode, info.uid = len(data), 0o644, 1000
                tar.addfile(info, io.BytesIO(data))
    return path


def test_layers_apply_in_order_with_whiteouts(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    fs.mkdir()
    apply_layer(layer(tmp_path / "1.tgz", {"etc": None, "etc/a": b"1", "etc/b": b"1", "opt": None,
                                           "opt/old": b"1", "opt/keep/x": b"1"}), fs)  # fmt: skip
    apply_layer(layer(tmp_path / "2.tgz", {"etc/a": b"2", "etc/.wh.b": b"", "opt/.wh..wh..opq": b"",
                                           "opt/new": b"2"}), fs)  # fmt: skip
    assert (fs / "etc/a").read_bytes() == b"2"  # a later layer wins
    assert not (fs / "etc/b").exists() and not (fs / "etc/.wh.b").exists()  # whiteout removes the lower file
    assert sorted(p.name for p in (fs / "opt").iterdir()) == ["new"]  # opaque folder: only this layer's content
    assert (fs / "etc/a").stat().st_uid == 1000  # owners kept (numeric)
    # A whiteout can also re-add the name in the same layer.
    apply_layer(layer(tmp_path / "3.tgz", {"etc/.wh.a": b"", "etc/a": b"3"}), fs)
    assert (fs / "etc/a").read_bytes() == b"3"


def test_a_layer_cannot_write_through_a_symlink_out_of_the_image(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    fs.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    apply_layer(layer(tmp_path / "1.tgz", {"escape": f"->{outside}"}), fs)
    with pytest.raises(PullError, match="outside the image"):
        apply_layer(layer(tmp_path / "2.tgz", {"escape/pwned": b"x"}), fs)
    assert not (outside / "pwned").exists()


def test_references_users_and_entrypoints() -> None:
    r = Reference.parse("127.0.0.1:5000/team/trainer:0.2.0-cpu")
    assert (r.registry, r.repository, r.tag, r.digest) == ("127.0.0.1:5000", "team/trainer", "0.2.0-cpu", None)
    r = Reference.parse("127.0.0.1:5000/trainer@sha256:" + "a" * 64)
    assert (r.tag, r.reference) == (None, "sha256:" + "a" * 64)
    assert Reference.parse("python").repository == "library/python"
    assert str(Reference.parse("python")) == "docker.io/library/python:latest"
    cfg = {"Entrypoint": ["ep"], "Cmd": ["cmd"]}
    assert container_argv(cfg, [], []) == ["ep", "cmd"]
    assert container_argv(cfg, [], ["a"]) == ["ep", "a"]
    assert container_argv(cfg, ["c"], []) == ["c"]
    assert container_argv(cfg, ["c"], ["a"]) == ["c", "a"]


def test_image_user_is_resolved_in_the_image(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n")
    (tmp_path / "etc/group").write_text("root:x:0:\nstaff:x:50:\n")
    assert resolve_user(tmp_path, "") == (0, 0, "")
    assert resolve_user(tmp_path, "app") == (1000, 1001, "")
    assert resolve_user(tmp_path, "1000") == (1000, 1001, "")
    assert resolve_user(tmp_path, "4000") == (4000, 4000, "")
    assert resolve_user(tmp_path, "app:staff") == (1000, 50, "")
    assert resolve_user(tmp_path, "10001:10001") == (10001, 10001, "")
    assert resolve_user(tmp_path, "ghost")[2] == "unable to find user ghost: no matching entries in passwd file"
