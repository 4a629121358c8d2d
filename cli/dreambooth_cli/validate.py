"""`dreambooth validate MANIFEST...`: the operator's validation of a DreamBoothJob, offline, for GitOps CI.

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

from dreambooth_api.config import ConfigError
from dreambooth_api.contract import EXIT_BAD_INPUT
from dreambooth_api.manifest import API_GROUP, KIND, load_documents
from dreambooth_operator.powers import ENV as POWERS_ENV
from dreambooth_operator.powers import parse_allow
from dreambooth_operator.spec import DEFAULT_MAX_NODES, SpecError, validate


def _ours(doc: Any) -> bool:
    """A document this command judges: a DreamBoothJob, or anything in our API group (a misspelt kind included)."""
    if not isinstance(doc, dict):
        return True  # a list or scalar where a manifest belongs: validate() names it
    return doc.get("kind") == KIND or str(doc.get("apiVersion", "")).startswith(f"{API_GROUP}/")


def check_file(path: str, max_nodes: int, allowed: frozenset[str]) -> tuple[list[str], str | None]:
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
            names.append(validate(doc, max_nodes=max_nodes, allowed_powers=allowed).name)
        except SpecError as exc:
            return names, f"{where}{exc}"
    return names, None


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
    args = parser.parse_args(argv)
    try:
        allowed = parse_allow(args.pod_powers)
    except ValueError as exc:
        print(f"error: --pod-powers: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for path in args.manifests:
        names, error = check_file(path, args.max_nodes, allowed)
        if error:
            print(f"error: {path}: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        found = ", ".join(names) if names else f"no {KIND}"
        print(f"{Path(path)}: valid ({found})")
    return 0
