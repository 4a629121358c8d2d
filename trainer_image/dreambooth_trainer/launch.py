"""``python -m dreambooth_trainer.launch``: the launcher (PID 1 of a trainer pod), or with ``--worker`` one
torchrun worker. Pods, the Dockerfile's ENTRYPOINT and the operator's golden files name this module; the code
is in `launcher` (the parent) and `worker` (the child)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        parser = argparse.ArgumentParser(prog="python -m dreambooth_trainer.launch --worker")
        parser.add_argument("--worker", action="store_true")
        parser.add_argument("--config", required=True)
        args = parser.parse_args(argv)
        from .worker import main as worker_main

        return worker_main(args.config)
    from .launcher import main as launcher_main

    return launcher_main(argv)


if __name__ == "__main__":
    sys.exit(main())
