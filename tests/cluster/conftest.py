"""Cluster tier: fixtures `cluster` (session) and `namespace` come from k8s_harness.fixtures (see there);
`operator` (the operator as a process, watching the test's namespace) and `jobs` from operator_support.

To use them from another test folder::

    sys.path.insert(0, str(REPO_ROOT / "tests" / "cluster"))
    from k8s_harness.fixtures import cluster, namespace  # noqa: F401 - pytest finds fixtures by name
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from k8s_harness.fixtures import cluster, namespace, pytest_terminal_summary  # noqa: E402, F401
from operator_support import jobs, operator, released, storage, trainer_image  # noqa: E402, F401
