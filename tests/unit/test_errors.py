"""errors.classify: the exit code of each kind of failure that can end a worker (docs/design.md, launcher
contract), from the exception's type alone."""

from __future__ import annotations

import pytest

from dreambooth_api.config import ConfigError
from dreambooth_api.contract import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_GPU_OOM, EXIT_PREEMPTED, PreemptedError
from dreambooth_trainer.data import DataError
from dreambooth_trainer.errors import classify, explained
from dreambooth_trainer.hub import HubError
from dreambooth_trainer.storage import AccessDeniedError, BucketMissingError, NotFoundError, StorageError

pytestmark = pytest.mark.unit


class OutOfMemoryError(RuntimeError):
    """Stands for torch.OutOfMemoryError, which is matched by name (the launcher side never imports torch)."""


@pytest.mark.parametrize(
    ("exc", "code", "one_line"),
    [
        (ConfigError("resolution", "must be a multiple of 8"), EXIT_BAD_INPUT, False),
        (DataError("no images in dog/"), EXIT_BAD_INPUT, False),
        (NotFoundError("s3://b/model holds no objects"), EXIT_BAD_INPUT, True),
        (AccessDeniedError("access denied to s3://b"), EXIT_BAD_INPUT, True),
        (BucketMissingError("bucket 'b' does not exist"), EXIT_BAD_INPUT, True),
        (StorageError("cannot reach S3 (gave up after 120 s)"), EXIT_CRASH, True),
        (HubError("the Hub is unreachable"), EXIT_CRASH, True),
        (PreemptedError(7, "s3://b/r/checkpoint-7", "stopped at step 7"), EXIT_PREEMPTED, False),
        (OutOfMemoryError("CUDA out of memory"), EXIT_GPU_OOM, False),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), EXIT_GPU_OOM, False),
        (RuntimeError("a bug"), EXIT_CRASH, False),
        (KeyboardInterrupt(), EXIT_CRASH, False),
    ],
)
def test_classify(exc: BaseException, code: int, one_line: bool) -> None:
    assert classify(exc) == code
    assert explained(exc) == one_line


def test_the_trainer_preemption_is_a_preemption() -> None:
    from dreambooth_trainer.train import Preempted

    assert classify(Preempted(3, None, "SIGTERM before the first step")) == EXIT_PREEMPTED
