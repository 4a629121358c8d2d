"""Entry point of the process kubelet process: ``python -m k8s_harness.run_kubelet --help``."""

import sys

from .kubelet import main

if __name__ == "__main__":
    sys.exit(main())
