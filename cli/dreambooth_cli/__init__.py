"""The `dreambooth` console script: the trainer's commands plus `crd`, `operator`, `validate` (dreambooth_cli.validate)
and the user commands (`get`, `watch`, `logs`, `images`, `download`: dreambooth_cli.user, also the kubectl plugin
`kubectl-dbj`).

The only module that knows both sides: the trainer never imports the operator and the operator never imports
the trainer (docs/design.md, "Packages and layers"), so the one command line that reaches both lives here.
"""

from __future__ import annotations

import sys

USER_COMMANDS = ("get", "watch", "logs", "images", "download")


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
    if cmd in USER_COMMANDS:
        from .user import main as user_main

        return user_main(argv)
    from dreambooth_trainer.cli import main as trainer_main

    code = trainer_main(argv)
    if cmd in ("", "-h", "--help", "help"):
        from .user import USAGE

        print(USAGE.strip("\n"))
    return code


def kubectl_main() -> int:
    if sys.argv[1:2] == ["validate"]:
        from .validate import main as validate_main

        return validate_main(sys.argv[2:], prog="kubectl dbj validate")
    from .user import kubectl_main as plugin_main

    return plugin_main()
