"""`dreambooth validate MANIFEST...`: the operator's validation of a DreamBoothJob, offline, for GitOps CI.

DreamBoothRuntime documents are checked as the webhook checks them. ``--runtime FILE`` lays jobs over a
runtime as the operator does when it accepts them (job ⊕ runtime ⊕ built-in defaults); ``--print-config``
prints that effective spec, the one the job's status.effectiveSpec will hold.

The same function the operator runs on every job and its admission webhook runs on every create and update
(``dreambooth_operator.spec.validate``), so a file that passes here is refused at ``kubectl apply`` only for
what needs the cluster: an edit of ``spec.training`` after acceptance, or a chart with other limits than the
flags given here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from dreambooth_api.config import ConfigError
from dreambooth_api.contract import EXIT_BAD_INPUT
from dreambooth_api.manifest import API_GROUP, KIND, load_documents
from dreambooth_api.runtime import RUNTIME_KIND, merge_spec, parse_runtime, runtime_ref, runtime_spec_set
from dreambooth_operator.powers import ENV as POWERS_ENV
from dreambooth_operator.powers import parse_allow
from dreambooth_operator.spec import DEFAULT_MAX_NODES, SpecError, validate, validate_runtime


class Options:
    def __init__(self, max_nodes: int, allowed: frozenset[str], runtimes: dict[str, dict[str, Any]],
                 default_image: str = "", print_config: bool = False) -> None:  # fmt: skip
        self.max_nodes, self.allowed, self.runtimes = max_nodes, allowed, runtimes
        self.default_image, self.print_config = default_image, print_config
        self.printed: list[dict[str, Any]] = []


def _base(doc: dict[str, Any], opts: Options) -> dict[str, Any]:
    """What the operator would lay this job over: the runtime it names (or the only one given) and the
    built-in defaults."""
    builtin: dict[str, Any] = {"resources": {"image": opts.default_image}} if opts.default_image else {}
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    name = runtime_ref(spec)
    if name is not None:
        if opts.runtimes and name not in opts.runtimes:
            raise SpecError(
                "spec.runtimeRef.name",
                f"names DreamBoothRuntime {name!r}, but --runtime gave {', '.join(sorted(opts.runtimes))}; pass its file.",
            )
        return merge_spec(builtin, opts.runtimes.get(name, {}))
    if len(opts.runtimes) == 1:
        # One runtime given and no runtimeRef: as if it were the cluster's default runtime.
        return merge_spec(builtin, next(iter(opts.runtimes.values())))
    return builtin


def _ours(doc: Any) -> bool:
    """A document this command judges: a DreamBoothJob, or anything in our API group (a misspelt kind included)."""
    if not isinstance(doc, dict):
        return True  # a list or scalar where a manifest belongs: validate() names it
    return doc.get("kind") == KIND or str(doc.get("apiVersion", "")).startswith(f"{API_GROUP}/")


def check_file(path: str, opts: Options) -> tuple[list[str], str | None]:
    """The names of the valid jobs in ``path``, and the first error ("field: message"), if any."""
    try:
        # "-": a rendered stream (kustomize build | dreambooth validate -), read with the same limits as a file.
        docs = load_documents("/dev/stdin" if path == "-" else path)
    except FileNotFoundError:
        return [], "does not exist"
    except IsADirectoryError:
        return [], "is a directory; pass the files (e.g. manifests/*.yaml)"
    except ConfigError as exc:
        return [], str(exc)
    names: list[str] = []
    for index, doc in enumerate(d for d in docs if _ours(d)):
        where = f"document {index + 1}: " if len(docs) > 1 else ""
        try:
            if isinstance(doc, dict) and doc.get("kind") == RUNTIME_KIND:
                names.append(validate_runtime(doc, opts.allowed))
                continue
            job = validate(doc, opts.max_nodes, opts.allowed, _base(doc, opts) if isinstance(doc, dict) else None)
            names.append(job.name)
            if opts.print_config:
                effective = job.spec.model_dump(by_alias=True, mode="json", exclude_none=True)
                opts.printed.append({"apiVersion": doc["apiVersion"], "kind": KIND,
                                     "metadata": {"name": job.name}, "spec": effective})  # fmt: skip
        except SpecError as exc:
            return names, f"{where}{exc}"
    return names, None


def load_runtimes(paths: list[str], allowed: frozenset[str]) -> dict[str, dict[str, Any]]:
    """--runtime files: name -> the spec as written (only what the runtime says)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            docs = [d for d in load_documents(path) if isinstance(d, dict) and d.get("kind") == RUNTIME_KIND]
        except (OSError, ConfigError) as exc:
            raise SpecError("--runtime", f"{path}: {exc}") from None
        if not docs:
            raise SpecError("--runtime", f"{path} holds no {RUNTIME_KIND}.")
        for doc in docs:
            try:
                validate_runtime(doc, allowed)
                name, spec = parse_runtime(doc)
            except (SpecError, ConfigError) as exc:
                raise SpecError("--runtime", f"{path}: {exc}") from None
            out[name] = runtime_spec_set(spec)
    return out


def main(argv: list[str] | None = None, prog: str = "dreambooth validate") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Check DreamBoothJob manifests as the operator would, without a cluster. Documents of other "
        f"kinds are skipped. Exit {EXIT_BAD_INPUT} on the first bad file, naming the field and the fix.",
    )
    parser.add_argument(
        "manifests", nargs="+", metavar="MANIFEST", help="YAML files (several documents allowed); - reads stdin"
    )
    parser.add_argument(
        "--max-nodes",
        type=int,
        default=int(os.environ.get("DREAMBOOTH_MAX_NODES", DEFAULT_MAX_NODES)),
        help="the cluster's chart value operator.maxNodes (default: $DREAMBOOTH_MAX_NODES or %(default)s)",
    )
    parser.add_argument(
        "--pod-powers",
        default=os.environ.get(POWERS_ENV, ""),
        help=f"the cluster's chart value operator.podPowers.allow, comma-separated (default: ${POWERS_ENV} or none)",
    )
    parser.add_argument(
        "--runtime",
        action="append",
        default=[],
        metavar="FILE",
        help=f"a {RUNTIME_KIND} file: jobs naming it (or naming none, when it is the only one) are checked over it",
    )
    parser.add_argument(
        "--default-image",
        default=os.environ.get("DREAMBOOTH_DEFAULT_TRAINER_IMAGE", ""),
        help="the cluster's chart value operator.defaultTrainerImage (default: the release's trainer image)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print each job's effective spec (job over runtime over built-in defaults) as YAML on stdout",
    )
    args = parser.parse_args(argv)
    try:
        allowed = parse_allow(args.pod_powers)
    except ValueError as exc:
        print(f"error: --pod-powers: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        runtimes = load_runtimes(args.runtime, allowed)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    opts = Options(args.max_nodes, allowed, runtimes, args.default_image.strip(), args.print_config)
    # With --print-config stdout is the YAML: the verdicts go to stderr.
    verdicts = sys.stderr if args.print_config else sys.stdout
    for path in args.manifests:
        names, error = check_file(path, opts)
        if error:
            print(f"error: {path}: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        found = ", ".join(names) if names else f"no {KIND}"
        print(f"{Path(path)}: valid ({found})", file=verdicts)
    if opts.printed:
        sys.stdout.write(yaml.safe_dump_all(opts.printed, sort_keys=False, width=120))
    return 0
