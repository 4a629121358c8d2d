"""Time the training steps of any trainer in this process: ours or diffusers' script, by the same clock.

    BENCH_WARMUP=10 BENCH_TOTAL=40 BENCH_OUT=f.json python benchmarks/gpu_timer.py -m dreambooth_trainer train ...
    BENCH_WARMUP=10 BENCH_TOTAL=40 BENCH_OUT=f.json python benchmarks/gpu_timer.py SCRIPT.py ARGS...

Every training step calls ``Tensor.backward`` once (accumulation 1), whether the optimizer step is then skipped
by the fp16 grad scaler or not, so the clock is the backward calls: the device is synchronised at the start of
call ``warmup + 1`` and of call ``total``, and the rate is the steps between them over the time between them.
Only those two marks synchronise: the trainer's own host syncs (or their absence) stay what they are. At exit
the marks and the peak GPU memory go to ``$BENCH_OUT`` as JSON. A script runs through script_shim/run_script.py
(torchvision stand-ins where torchvision is missing).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch

WARMUP = int(os.environ.get("BENCH_WARMUP", "10"))
TOTAL = int(os.environ.get("BENCH_TOTAL", "40"))
marks: dict[int, float] = {}
calls = 0
_backward = torch.Tensor.backward


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_backward(self: torch.Tensor, *args: object, **kwargs: object) -> None:
    global calls
    calls += 1
    if calls in (WARMUP + 1, TOTAL):
        _sync()
        marks[calls] = time.perf_counter()
    _backward(self, *args, **kwargs)  # type: ignore[arg-type]


def _report() -> None:
    doc: dict[str, object] = {"calls": calls, "marks": {str(k): v for k, v in marks.items()}}
    if WARMUP + 1 in marks and TOTAL in marks and TOTAL > WARMUP + 1:
        doc["steps_per_s"] = (TOTAL - WARMUP - 1) / (marks[TOTAL] - marks[WARMUP + 1])
    if torch.cuda.is_available():
        doc["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out = os.environ.get("BENCH_OUT")
    if out:
        Path(out).write_text(json.dumps(doc))


def main() -> None:
    torch.Tensor.backward = _timed_backward  # type: ignore[method-assign]
    atexit.register(_report)
    if sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [str(Path(__file__).parent / "script_shim" / "run_script.py"), *sys.argv[1:]]
        sys.path.insert(0, str(Path(__file__).parent / "script_shim"))
        from run_script import main as run_script

        run_script()


if __name__ == "__main__":
    main()
