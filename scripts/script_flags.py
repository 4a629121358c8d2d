"""Extract a diffusers training script's flag table (name, default, choices, required, type) from its AST.

Usage: python scripts/script_flags.py SCRIPT.py > tests/unit/data/SCRIPT.flags.json

The script is read, never imported (it needs torchvision, datasets, ...): every ``parser.add_argument(...)``
call's literal keyword arguments are recorded. The table is the reference the unit tests hold our CLI against.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any

_UNSET = "<unset>"


def _literal(node: ast.AST | None) -> Any:
    if node is None:
        return _UNSET
    try:
        return ast.literal_eval(node)
    except ValueError:
        return f"<expr {ast.unparse(node)}>"


def flag_table(source: str) -> list[dict[str, Any]]:
    flags = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
        if not names:
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        action = _literal(kw.get("action"))
        default = _literal(kw.get("default"))
        if default == _UNSET:
            default = False if action == "store_true" else None
        type_node = kw.get("type")
        flags.append(
            {
                "name": names[0].removeprefix("--"),
                "default": default,
                "required": _literal(kw.get("required")) is True,
                "choices": None if "choices" not in kw else _literal(kw["choices"]),
                "type": "bool" if action == "store_true" else (ast.unparse(type_node) if type_node else "str"),
                "nargs": None if "nargs" not in kw else _literal(kw["nargs"]),
            }
        )
    return sorted(flags, key=lambda f: f["name"])


def main(argv: list[str]) -> int:
    script = Path(argv[0])
    table = {"script": script.name, "source": argv[1] if len(argv) > 1 else "", "flags": flag_table(script.read_text())}
    json.dump(table, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
