"""`dreambooth run MANIFEST`: the cluster's DreamBoothJob, on this machine, through the same launcher as a pod."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from dreambooth_api.config import COMMANDS, ConfigError
from dreambooth_api.contract import EXIT_BAD_INPUT
from dreambooth_api.manifest import Job, load_job


def process_count(job: Job, override: int | None) -> int:
    """torchrun processes here: the manifest's GPUs per node when this machine has that many GPUs, else 1."""
    if override:
        return override
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    want = job.spec.resources.gpus_per_node
    if gpus == 0 or want == 0:
        return 1
    return min(want, gpus)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dreambooth run",
        description="Run a DreamBoothJob manifest on this machine (no cluster). Relative paths are relative to "
        "the current directory; s3:// paths use spec.storage and the standard AWS credential chain.",
    )
    parser.add_argument("manifest", help="a YAML file holding one DreamBoothJob")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="override the number of processes")
    parser.add_argument("--print-config", action="store_true", help="print the trainer flags and exit")
    args = parser.parse_args(argv)
    try:
        job, cfg = load_job(args.manifest)
    except ConfigError as exc:
        print(f"error: {args.manifest}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FileNotFoundError:
        print(f"error: {args.manifest} does not exist", file=sys.stderr)
        return EXIT_BAD_INPUT
    cmd = COMMANDS[cfg.method]
    misplaced = misplaced_paths(cfg, Path(args.manifest), Path.cwd())
    if misplaced:
        print(f"error: {args.manifest}: {misplaced[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.print_config:
        print(f"dreambooth {cmd} " + " ".join(_quote(a) for a in _masked(cfg.cli_args())))
        return 0
    if job.spec.resources.nodes > 1:
        print(f"note: spec.resources.nodes={job.spec.resources.nodes} applies on a cluster; running one node here.")
    os.environ.update({k: v for k, v in job.spec.storage.env().items() if k not in os.environ})
    nproc = process_count(job, args.nproc_per_node)
    print(f"dreambooth run: job {job.name}, method {cfg.method}, {nproc} process(es), output {cfg.output_dir}")
    with tempfile.TemporaryDirectory(prefix="dreambooth-run-") as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps({"method": cfg.method, "training": cfg.to_training_spec()}))
        from .launcher import main as launch_main

        code = launch_main(["--config", str(config_file), "--nproc-per-node", str(nproc)])
    _summary(cfg, code)
    return code


def _summary(cfg, code: int) -> None:
    from .storage import open_store

    out = open_store(cfg.output_dir)
    if code == 0:
        what = "LoRA weights (pytorch_lora_weights.safetensors)" if cfg.method != "full" else "diffusers pipeline"
        print(f"\ndone: {what} in {out.uri}")
    else:
        print(f"\nrun ended with exit code {code} (64 bad input, 70 crash, 71 GPU OOM, 75 preempted)")
    try:
        latest = out.read_text("LATEST").strip()
        print(f"last checkpoint: {out.url(latest)}  (the same command resumes from it)")
    except Exception:  # noqa: BLE001 - a summary must never fail the run
        pass
    try:
        images = [o.key for o in out.list("validation/") if o.key.endswith(".png")]
        if images:
            print(f"validation images: {out.url('validation')} ({len(images)} files)")
    except Exception:  # noqa: BLE001
        pass


def _masked(args: list[str]) -> list[str]:
    """The flags with secret values hidden: --print-config output ends up in terminals, CI logs and tickets."""
    out = list(args)
    for i, arg in enumerate(out):
        name = arg.split("=", 1)[0]
        if name == "--hub_token":
            if "=" in arg:
                out[i] = f"{name}=***"
            elif i + 1 < len(out):
                out[i + 1] = "***"
    return out


def _quote(arg: str) -> str:
    return f"'{arg}'" if (" " in arg or not arg) else arg


_PATH_FIELDS = ("pretrained_model_name_or_path", "instance_data_dir", "class_data_dir")


def misplaced_paths(cfg, manifest: Path, cwd: Path) -> list[str]:
    """Relative local paths mean "from the current directory" (the quickstart relies on it); one that does not
    exist there but does next to the manifest was meant from there: say so and how, instead of "does not exist"."""
    from dreambooth_api.config import flag_and_field

    out = []
    base = manifest.resolve().parent
    for name in _PATH_FIELDS:
        value = getattr(cfg, name, None)
        if not value or "://" in value or Path(value).is_absolute() or (cwd / value).exists():
            continue
        if base != cwd.resolve() and (base / value).exists():
            field = flag_and_field(name).split(" ", 1)[1].strip("()")
            out.append(
                f"{field}: {value!r} does not exist here ({cwd / value}) but does next to the manifest "
                f"({base / value}); relative paths are from the current directory: run `cd {base} && dreambooth run "
                f"{manifest.name}`, or make the path absolute."
            )
    return out
