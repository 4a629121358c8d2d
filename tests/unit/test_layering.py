"""The package layering of docs/design.md, checked on the source (function-local imports included):

- no import cycle between modules of the project;
- dreambooth_api imports none of the other packages and no heavy library (torch, diffusers, kopf, ...);
- the operator imports dreambooth_api only, and nothing that imports torch;
- the trainer never imports the operator; only dreambooth_cli reaches both;
- the operator's watch cache imports neither the planner nor the reconciler.

The checker is shown to bite: a seeded package with a function-local cycle and a layer breach fails it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
ROOTS = [REPO / "api", REPO / "cli", REPO / "trainer_image", REPO / "operator"]
HEAVY = {"torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "numpy", "PIL", "boto3"}
# Who may import whom, by top-level package (a package always may import itself and third-party libraries).
ALLOWED = {
    "dreambooth_api": set(),
    "dreambooth_trainer": {"dreambooth_api"},
    "dreambooth_operator": {"dreambooth_api"},
    "dreambooth_cli": {"dreambooth_api", "dreambooth_trainer", "dreambooth_operator"},
}
NO_HEAVY = {"dreambooth_api", "dreambooth_operator"}
# Modules kept leaves of their package: the operator's watch cache serves the reconciler, never decides for it.
LEAVES = {"dreambooth_operator.cache": ("dreambooth_operator.plan", "dreambooth_operator.reconciler")}


def module_files(roots: Iterable[Path]) -> dict[str, Path]:
    out = {}
    for root in roots:
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and not any(p.startswith(".") or p == "__pycache__" for p in parts):
                out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    # `from pkg import mod` may name a submodule: keep both candidates, the caller keeps the known ones.
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> every module it imports anywhere in its body (top level, functions, TYPE_CHECKING excluded)."""
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        type_checking = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                targets.update(_resolve(name, path.name == "__init__.py", node))
        graph[name] = targets
    return graph


def _known(target: str, files: dict[str, Path]) -> str | None:
    """The project module an import names (itself, or its nearest package), or None for a third-party one."""
    parts = target.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in files:
            return cand
        parts.pop()
    return None


def cycles(files: dict[str, Path], graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected set of modules larger than one (Tarjan). A package's __init__ importing its own
    submodules is not a cycle of concern: edges from a submodule to its own ancestor package are dropped."""
    edges = {
        m: {k for t in ts if (k := _known(t, files)) and k != m and not m.startswith(k + ".")}
        for m, ts in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def layer_breaches(files: dict[str, Path], graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in graph.items():
        top = module.split(".")[0]
        if top not in ALLOWED:
            continue
        for target in targets:
            other = target.split(".")[0]
            if other in ALLOWED and other != top and other not in ALLOWED[top]:
                out.append(f"{module} imports {target}")
            if top in NO_HEAVY and other in HEAVY:
                out.append(f"{module} imports {target} (must stay torch-free)")
            if any(target == f or target.startswith(f + ".") for f in LEAVES.get(module, ())):
                out.append(f"{module} imports {target} (it must stay a leaf)")
    return sorted(set(out))


def check(roots: Iterable[Path]) -> list[str]:
    files = module_files(roots)
    graph = import_graph(files)
    return [f"import cycle: {' <-> '.join(c)}" for c in cycles(files, graph)] + layer_breaches(files, graph)


def test_the_project_has_no_cycles_and_keeps_its_layers() -> None:
    problems = check(ROOTS)
    assert not problems, "\n".join(problems)


def test_the_checker_bites_on_a_seeded_violation(tmp_path: Path) -> None:
    op = tmp_path / "operator" / "dreambooth_operator"
    api = tmp_path / "api" / "dreambooth_api"
    for folder in (op, api):
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
    # A cycle made only of function-local imports, and an operator module that reaches for the trainer and torch.
    (op / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (op / "b.py").write_text("def g():\n    from .a import f\n    return f\n")
    (op / "c.py").write_text("import torch\n\ndef h():\n    from dreambooth_trainer.train import Trainer\n")
    (api / "d.py").write_text("from dreambooth_operator import a\n")
    (op / "cache.py").write_text("def live():\n    from .plan import Plan\n")
    (op / "plan.py").write_text("Plan = object\n")
    problems = check([tmp_path / "operator", tmp_path / "api"])
    assert "import cycle: dreambooth_operator.a <-> dreambooth_operator.b" in problems, problems
    assert "dreambooth_operator.c imports dreambooth_trainer.train" in problems, problems
    assert "dreambooth_operator.c imports torch (must stay torch-free)" in problems, problems
    assert "dreambooth_api.d imports dreambooth_operator" in problems, problems
    assert "dreambooth_operator.cache imports dreambooth_operator.plan (it must stay a leaf)" in problems, problems
