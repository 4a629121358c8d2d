"""The `dreambooth` console script: the trainer's commands plus `crd`, `operator` and `validate`.

The only module that knows both sides: the trainer never imports the operator and the operator never imports
the trainer (docs/design.md, "Packages and layers"), so the one command line that reaches both lives here.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd, rest = (argv[0], argv[1:]) if argv else ("", [])
    if cmd == "crd":
        from dreambooth_operator.crd import main as crd_main

        return crd_main(rest)
    if cmd == "validate":
        from .validate import main as validate_main

        return validate_main(rest)
    if cmd == "operator":
        from dreambooth_operator.__main__ import main as operator_main

        return operator_main(rest)
    from dreambooth_trainer.cli import main as trainer_main

    return trainer_main(argv)
