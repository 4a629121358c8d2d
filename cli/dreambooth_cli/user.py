"""`dreambooth get|watch|logs|images|download` (also the kubectl plugin `kubectl dbj ...`): a job from a terminal.

Cluster access as kubectl (--kubeconfig, --context, -n/--namespace); S3 through the standard AWS credential
chain and the job's storage endpoint (--s3-endpoint overrides it). Every failure a user can cause or fix is one
line on stderr and exit 1 (errors.UserError), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import webbrowser
from pathlib import Path
from typing import Any

import yaml

from dreambooth_api.runtime import effective_of
from dreambooth_trainer import gallery

from . import render
from .errors import UserError
from .kube import Kube, KubeTarget
from .objects import download_checkpoint, download_final, output_for, validation_images

COMMANDS = ("get", "watch", "logs", "images", "download")
USAGE = """
user commands (a job in the cluster; kubectl's --kubeconfig, --context, -n flags):
  get [JOB]      the jobs' table (phase, attempt, restarts, preemptions, queue, progress); -o yaml|json
  watch JOB      live progress, phase changes and Events until the job ends (exit 0 Succeeded, 1 Failed)
  logs JOB       a rank's log: from the pod while it runs, from S3 after (--rank, --attempt, -f)
  images JOB     download the validation images and write a self-contained HTML gallery (--open)
  download JOB DIR   the final model or --checkpoint N, every file verified by sha256
"""


def _parser(prog: str) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    common.add_argument("--context", help="kubeconfig context (default: the current one)")
    common.add_argument("-n", "--namespace", help="namespace (default: the context's, else 'default')")
    s3 = argparse.ArgumentParser(add_help=False)
    s3.add_argument("--s3-endpoint", help="S3 endpoint URL (default: the job's spec.storage.endpoint)")

    p = argparse.ArgumentParser(prog=prog, description="See a DreamBoothJob from a terminal and a browser.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    g = sub.add_parser("get", parents=[common], help="list jobs or show one")
    g.add_argument("job", nargs="?")
    g.add_argument("-o", "--output", choices=["table", "yaml", "json", "name"], default="table")
    g.add_argument("-A", "--all-namespaces", action="store_true")
    w = sub.add_parser("watch", parents=[common], help="follow a job until it ends")
    w.add_argument("job")
    w.add_argument("--interval", type=float, default=1.0, help="seconds between reads (default 1)")
    lg = sub.add_parser("logs", parents=[common, s3], help="a rank's log")
    lg.add_argument("job")
    lg.add_argument("--rank", type=int, default=0)
    lg.add_argument("--attempt", type=int, help="default: the current attempt")
    lg.add_argument("-f", "--follow", action="store_true", help="keep streaming while the pod runs")
    im = sub.add_parser("images", parents=[common, s3], help="validation images and their gallery")
    im.add_argument("job")
    im.add_argument("dir", nargs="?", help="where to write (default: ./<job>-validation)")
    im.add_argument("--open", action="store_true", help="open the gallery in a browser")
    d = sub.add_parser("download", parents=[common, s3], help="the final model or a checkpoint, verified")
    d.add_argument("job")
    d.add_argument("dir")
    d.add_argument("--checkpoint", help="a checkpoint step, or 'latest' (default: the final model)")
    d.add_argument("--presign", action="store_true", help="print presigned URLs instead of downloading")
    # Listed for --help only: the command line is handed to dreambooth_cli.validate before this parser runs.
    sub.add_parser("validate", help="check manifests offline as the operator would (exit 64 on the first bad file)")
    return p


def _kube(args: argparse.Namespace) -> Kube:
    return Kube(KubeTarget(args.kubeconfig, args.context, args.namespace))


# ------------------------------------------------------------------------------------------------------ get
def cmd_get(args: argparse.Namespace) -> int:
    kube = _kube(args)
    items = [kube.job(args.job)] if args.job else kube.jobs(args.all_namespaces)
    if args.output in ("json", "yaml"):
        doc: Any = items[0] if args.job else {"apiVersion": "v1", "kind": "List", "items": items}
        print(json.dumps(doc, indent=2) if args.output == "json" else yaml.safe_dump(doc, sort_keys=False), end="")
        if args.output == "json":
            print()
        return 0
    if args.output == "name":
        for j in items:
            print(f"dreamboothjob.dreambooth.dev/{j['metadata']['name']}")
        return 0
    if not items:
        print(f"No resources found in {kube.namespace} namespace.", file=sys.stderr)
        return 0
    rows = [render.job_row(j) for j in items]
    nss = [j["metadata"].get("namespace", "") for j in items]
    print(render.table(rows, with_namespace=args.all_namespaces, namespaces=nss))
    return 0


# ---------------------------------------------------------------------------------------------------- watch
def cmd_watch(args: argparse.Namespace) -> int:
    kube = _kube(args)
    job = kube.job(args.job)
    tty = sys.stdout.isatty()
    seen: set[tuple[str, int]] = set()
    phase: str | None = None
    last_line = ""
    last_startup: str | None = None
    while True:
        st = job.get("status") or {}
        new_phase = st.get("phase") or "Pending"
        out: list[str] = []
        if new_phase != phase:
            out.append(render.phase_line(phase, st))
            phase = new_phase
        for e in render.events_sorted(kube.events(args.job)):
            key = render.event_key(e)
            if key not in seen:
                seen.add(key)
                out.append(render.event_line(e))
        startup = render.startup_line(st)
        if startup and startup != last_startup:
            out.append(startup)
            last_startup = startup
        line = render.progress_line(st)
        if tty:
            # The bar is redrawn in place; phase changes and Events scroll above it.
            sys.stdout.write("\r\033[K" + "".join(x + "\n" for x in out) + line)
        else:
            if line != last_line and st.get("step") is not None:
                out.append(line)
            sys.stdout.write("".join(x + "\n" for x in out))
        last_line = line
        sys.stdout.flush()
        if phase in render.FINISHED:
            if tty:
                sys.stdout.write("\n")
            print(f"{args.job} {phase}" + (f": {st['message']}" if st.get("message") else ""))
            return 0 if phase == "Succeeded" else 1
        time.sleep(args.interval)
        fresh = kube.job_or_none(args.job)
        if fresh is None:
            raise UserError(f"dreamboothjob {args.job} was deleted while watching")
        job = fresh


# ----------------------------------------------------------------------------------------------------- logs
def _write_bytes(chunks: Any) -> None:
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()


def cmd_logs(args: argparse.Namespace) -> int:
    kube = _kube(args)
    job = kube.job(args.job)
    st = job.get("status") or {}
    attempt = args.attempt or st.get("attempt")
    if not attempt:
        raise UserError(f"{args.job} has not started an attempt yet (phase {st.get('phase') or 'Pending'})")
    gpus = int((effective_of(job).get("resources") or {}).get("gpusPerNode") or 1)
    index = args.rank // max(gpus, 1)
    pod = next((p for p in kube.pods(args.job, attempt)
                if p["metadata"].get("labels", {}).get("dreambooth.dev/pod-index") == str(index)), None)  # fmt: skip
    live = pod is not None and (pod.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")
    if live and st.get("phase") not in render.FINISHED:
        # While it runs the pod's own log is the freshest (S3's copy is uploaded every few seconds).
        if gpus > 1:
            print(f"(pod {pod['metadata']['name']} holds ranks {index * gpus}..{index * gpus + gpus - 1})",
                  file=sys.stderr)  # fmt: skip
        try:
            _write_bytes(kube.pod_log(pod["metadata"]["name"], follow=args.follow))
            return 0
        except UserError as e:
            # A node's kubelet may be unreachable from the apiserver: the trainer's copy in S3 is seconds behind.
            print(f"({e}; showing the copy in S3 instead)", file=sys.stderr)
    out = output_for(job, args.s3_endpoint)
    key = f"logs/attempt-{attempt}/rank-{args.rank}.log"
    try:
        data = out.read(key)
    except UserError:
        have = sorted(k for k in out.list_keys("logs/") if k.endswith(".log"))
        raise UserError(f"no log {out.uri}{key} (logs there: {', '.join(have) or 'none'})") from None
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------------------------------- images
def cmd_images(args: argparse.Namespace) -> int:
    kube = _kube(args)
    job = kube.job(args.job)
    out = output_for(job, args.s3_endpoint)
    dest = Path(args.dir or f"{args.job}-validation")
    found = validation_images(out)
    steps: dict[int, list[tuple[str, bytes]]] = {}
    for step, keys in found.items():
        steps[step] = []
        for key in keys:
            data = out.read(key)
            path = dest / key.removeprefix("validation/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            steps[step].append((path.name, data))
    training = (job.get("spec") or {}).get("training") or {}
    dest.mkdir(parents=True, exist_ok=True)
    page = dest / "index.html"
    page.write_text(gallery.render(args.job, steps, training.get("validationPrompt"), source=out.uri + "validation/"))
    n = sum(len(v) for v in steps.values())
    print(f"{n} image(s) of {len(steps)} validation(s) -> {page}")
    if args.open:
        webbrowser.open(page.resolve().as_uri())
    return 0


# ------------------------------------------------------------------------------------------------- download
def cmd_download(args: argparse.Namespace) -> int:
    kube = _kube(args)
    job = kube.job(args.job)
    out = output_for(job, args.s3_endpoint)
    dest = Path(args.dir)
    if args.checkpoint is not None:
        if args.checkpoint == "latest":
            step = out.latest_checkpoint()
        elif args.checkpoint.isdigit():
            step = int(args.checkpoint)
        else:
            raise UserError(f"--checkpoint {args.checkpoint!r}: give a step number (e.g. 400) or 'latest'")
        if args.presign:
            manifest = json.loads(out.read(f"checkpoint-{step}/manifest.json"))
            for rel in sorted(manifest.get("files") or {}):
                print(f"{rel}\t{out.presign(f'checkpoint-{step}/{rel}')}")
            return 0
        files = download_checkpoint(out, step, dest)
        print(f"checkpoint-{step}: {len(files)} file(s) verified against its manifest -> {dest}")
        return 0
    phase = (job.get("status") or {}).get("phase")
    if args.presign:
        from .objects import final_model_keys

        for key in final_model_keys(out):
            print(f"{key}\t{out.presign(key)}")
        return 0
    files = download_final(out, dest, phase)
    print(f"final model: {len(files)} file(s) verified by sha256 -> {dest}")
    return 0


HANDLERS = {"get": cmd_get, "watch": cmd_watch, "logs": cmd_logs, "images": cmd_images, "download": cmd_download}


def main(argv: list[str], prog: str = "dreambooth") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        return HANDLERS[args.cmd](args)
    except UserError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def kubectl_main(argv: list[str] | None = None) -> int:
    """`kubectl dbj ...` (kubectl runs the `kubectl-dbj` executable on PATH with the rest of the line)."""
    return main(list(sys.argv[1:] if argv is None else argv), prog="kubectl dbj")
