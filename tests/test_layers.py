"""Layers import one way: ``data``, ``models``, ``objectives`` and ``weights`` never import the tasks, the
trainers (``engine``) or the evaluation suites, and no task imports another. Every import is read from the
source (also the ones inside functions), so a lazy import cannot hide an edge."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "visionfm"
LOWER = ("data", "models", "objectives", "weights")
UPPER = ("tasks", "engine", "evaluation", "inference", "pretrain_cli", "pretrain_mae_cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[Tuple[int, str]]:
    """``(line, absolute module)`` of every ``visionfm`` import in a file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("visionfm"):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("visionfm"):
                for alias in node.names:  # ``from . import x`` names a module too
                    yield node.lineno, target if node.module else f"{target}.{alias.name}"


def wrong_edges() -> list:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module_name(path).split(".")
        for line, target in imports(path):
            dest = target.split(".")
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            if len(source) > 1 and source[1] in LOWER and len(dest) > 1 and dest[1] in UPPER:
                edges.append(where)
            if (len(source) > 2 and source[1] == "tasks" and len(dest) > 2 and dest[1] == "tasks"
                    and dest[2] != source[2]):
                edges.append(where)
    return edges


def test_layers_import_one_way():
    assert wrong_edges() == []


def test_the_walk_sees_relative_and_lazy_imports(tmp_path):
    """The checker itself must be able to fail: a lazy relative import of a task from a lower layer is found."""
    fake = PACKAGE / "data" / "_layer_probe_tmp.py"
    fake.write_text("def f():\n    from ..tasks.segmentation import runner\n    from ..engine import checkpoint\n")
    try:
        found = [e for e in wrong_edges() if "_layer_probe_tmp" in e]
    finally:
        fake.unlink()
    assert len(found) == 2 and "visionfm.tasks.segmentation" in found[0]
