"""Release artifacts: image sizes, cold / cached / code-change build times, push and pull times.

    .venv/bin/python benchmarks/artifacts.py                       # operator + trainer-cpu
    .venv/bin/python benchmarks/artifacts.py --images operator --no-cold
    .venv/bin/python benchmarks/artifacts.py --images trainer-cuda # after the opt-in CUDA build (~4 GB download)

Builds with tests/images.py (buildah, the debootstrapped base pinned by digest, the wheelhouse as the `wheels`
build context, no index), in the tests' cache (~/.cache/dreambooth-operator/buildah). Per image:

    size        uncompressed layers (what a node's disk holds); compressed = what the registry stores
    cold        every Dockerfile step run (--no-cache), base image and wheelhouse already made
    cached      the same build again: every step from the layer cache
    code        one line of the project's source changed: only the layers after `COPY trainer_image/` rerun
    push        to docker-registry on 127.0.0.1 (plain HTTP; layers compressed by buildah on the way)
    pull        by digest into an empty storage

Root only (buildah). Figures on a shared machine include other processes' load (printed alongside).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import images  # noqa: E402
from registry import Registry  # noqa: E402

MB = 1e6
# What the build context holds (.dockerignore is an allow-list of these).
CONTEXT = (
    "Dockerfile",
    ".dockerignore",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "docker",
    "trainer_image",
    "operator",
)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def build(b: images.Buildah, name: str, *extra: str, context: Path | None = None) -> float:
    variant = images.VARIANTS[name]
    wheels = None if name == "trainer-cuda" else images.wheelhouse(b.root)
    cmd = images.build_command(variant, variant.tag, b.base_reference(), wheels, context=context)
    cmd[1:1] = list(extra)
    with images.locked(b.root / ".lock"):
        seconds, _ = timed(b, *cmd, timeout=7200)
    return seconds


def code_change_build(b: images.Buildah, name: str, tmp: Path) -> float:
    """A copy of the build context with one comment line added to the project's source."""
    context = tmp / "context"
    for item in CONTEXT:
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, context / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            context.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, context / item)
    init = context / "operator" / "dreambooth_operator" / "__init__.py"
    init.write_text(init.read_text() + f"# benchmark edit {time.time()}\n")
    try:
        return build(b, name, context=context)
    finally:
        # Put the tag back on the repository's own build (from cache) for the tests that use it.
        build(b, name)


def compressed_size(registry: Registry, repository: str, tag: str) -> int:
    import urllib.request

    req = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                 "application/vnd.docker.distribution.manifest.v2+json"},
    )  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        manifest = json.load(resp)
    return sum(layer["size"] for layer in manifest["layers"]) + manifest["config"]["size"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images", default="operator,trainer-cpu", help="comma-separated: " + ",".join(images.VARIANTS)
    )
    parser.add_argument("--no-cold", action="store_true", help="skip the --no-cache build (minutes for the trainer)")
    parser.add_argument("--no-code", action="store_true", help="skip the code-change rebuild")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/artifacts.py: buildah needs root here")
    names = [n.strip() for n in args.images.split(",") if n.strip()]
    unknown = [n for n in names if n not in images.VARIANTS]
    if unknown:
        sys.exit(f"--images: unknown {unknown}; choose from {sorted(images.VARIANTS)}")

    t_base, b = timed(images.ensure_base)
    t_wheels, _ = timed(images.wheelhouse, b.root)
    print(f"# base image ready in {t_base:.1f}s, wheelhouse in {t_wheels:.1f}s (cached when ~0)", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="artifacts-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        registry = Registry(tmp / "registry")
        registry.start()
        try:
            for name in names:
                row: dict[str, object] = {"image": name}
                if not args.no_cold:
                    row["cold_s"] = build(b, name, "--no-cache")
                build(b, name)  # ensure it exists (and warm the cache) before timing the cached build
                row["cached_s"] = build(b, name)
                if not args.no_code:
                    row["code_s"] = code_change_build(b, name, tmp / name)
                tag = images.VARIANTS[name].tag
                row["size_mb"] = b.size(tag) / MB
                repository = tag.split("/", 1)[1].split(":")[0]
                ref = f"{registry.host}/{repository}:{name}"
                b("tag", tag, ref)
                row["push_s"], _ = timed(
                    b, "push", "--quiet", "--tls-verify=false", ref, f"docker://{ref}", timeout=3600
                )
                digest = registry.manifest_digest(repository, name)
                row["compressed_mb"] = compressed_size(registry, repository, name) / MB
                fresh = images.Buildah(tmp / f"pull-{name}")
                row["pull_s"], _ = timed(fresh, "pull", "--quiet", "--tls-verify=false",
                                         f"docker://{registry.host}/{repository}@{digest}", timeout=3600)  # fmt: skip
                b("rmi", ref, check=False)
                # (rm -rf: an overlay storage holds tens of thousands of files; shutil.rmtree takes minutes)
                subprocess.run(["rm", "-rf", str(tmp / f"pull-{name}")], check=False)
                rows.append(row)
                print(
                    json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr
                )
        finally:
            registry.stop()
            with images.locked(b.root / ".lock"):
                b("rmi", "--prune", check=False)
    cols = ["image", "size_mb", "compressed_mb", "cold_s", "cached_s", "code_s", "push_s", "pull_s"]
    print("  ".join(f"{c:>13}" for c in cols))
    for row in rows:
        cells = [f"{row[c]:13.1f}" if isinstance(row.get(c), float) else f"{row.get(c, '-')!s:>13}" for c in cols]
        print("  ".join(cells))
    load = os.getloadavg()
    print(f"# load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs", file=sys.stderr)
    target = next((r for r in rows if r["image"] == "operator"), None)
    if target:
        verdict = "meets" if target["size_mb"] <= 250 else "MISSES"
        print(f"# operator image {target['size_mb']:.0f} MB {verdict} the 250 MB target", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
