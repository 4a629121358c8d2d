"""Run a diffusers example script with the torchvision stand-ins of this folder.

    python benchmarks/script_shim/run_script.py SCRIPT.py ARGS...

The libraries decide once whether torchvision is installed; they are told it is not (so they keep their
PIL paths, as on a machine without it) before the stand-ins go on sys.path for the script's own imports.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    import diffusers  # noqa: F401 - computes its torchvision flag now, without the stand-ins
    import transformers.utils.import_utils as tiu

    real = tiu._is_package_available

    def without_torchvision(pkg_name: str, return_version: bool = False):  # noqa: ANN202
        if pkg_name == "torchvision":
            return (False, "N/A")
        return real(pkg_name, return_version)

    tiu._is_package_available = without_torchvision
    # The check is cached and imported by name: replace it wherever transformers already holds it.
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and hasattr(module, "is_torchvision_available"):
            module.is_torchvision_available = lambda: False
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
