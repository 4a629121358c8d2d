"""torchrun, minus the traceback it prints when a worker fails.

The launcher reads every rank's result file and reports the root cause in one line (and in the termination
message); torchrun's ChildFailedError banner, ~25 lines ending in a Python traceback, followed every bad input and
preemption and buried that line. Everything else is torchrun's own code: the same flags, rendezvous, signal
handling and exit status (1 when a worker failed).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        failed = ", ".join(f"local rank {f.local_rank} exit {f.exitcode}" for _, f in sorted(exc.failures.items()))
        print(f"torchrun: worker(s) failed: {failed}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
