"""The layer table of DEVELOPERS.md, enforced: imports flow one way.

    config -> data -> model -> train -> evaluate -> export / serve

Every `import` in src/tunelab (module level or inside a function) is read with `ast`; a module
may import its own layer and the layers before it, never a later one. The documented
exceptions: `tunelab/cli.py` sits above every stage (it wires them together and lends later
stages to earlier ones, DEVELOPERS.md "Hooks between stages"), and `tunelab/__init__.py` is
the package's front door.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"

# Rank of each layer; export and serve share one (neither imports the other).
LAYERS = {"errors": 0, "io": 0, "hub": 0, "config": 1, "compat": 1, "data": 2, "model": 3, "train": 4,
          "evaluate": 5, "export": 6, "serve": 6, "board": 6, "sweep": 6, "chain": 7}
ABOVE_ALL = {"cli", "__init__", "__main__", "api"}  # front doors: may import every stage


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name inside tunelab ("tunelab.data.readers" -> "data")."""
    parts = module.split(".")
    if parts[0] != "tunelab":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every tunelab import in a file, relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from tunelab import data` imports the package tunelab.data
            names = [f"{base}.{a.name}" for a in node.names] if base == "tunelab" else [base]
            out += [(node.lineno, name) for name in names]
    return [(line, name) for line, name in out if name.split(".")[0] == "tunelab"]


def upward_imports(path: Path) -> list[str]:
    here = layer_of(module_name(path))
    if here in ABOVE_ALL or module_name(path) == "tunelab":
        return []
    if here not in LAYERS:
        return [f"{path.relative_to(SRC)}: module of no layer; add it to LAYERS (and DEVELOPERS.md's table)"]
    bad = []
    for line, name in imported_modules(path):
        there = layer_of(name)
        if there in ABOVE_ALL or there == "__init__" or LAYERS.get(there, -1) > LAYERS[here]:
            bad.append(f"{path.relative_to(SRC)}:{line} ({here}) imports {name} ({there})")
    return bad


def test_imports_flow_one_way():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50
    violations = [v for path in files for v in upward_imports(path)]
    assert not violations, "imports against the layer table (DEVELOPERS.md):\n" + "\n".join(violations)


@pytest.mark.parametrize("source, found", [
    ("from tunelab.model.loader import load_tokenizer\n", True),
    ("def f():\n    from tunelab.model import loader\n", True),  # inside a function counts too
    ("from ...model import loader\n", True),  # relative, from tunelab/data/tools/
    ("from tunelab import cli\n", True),
    ("from tunelab.data.types import Message\nfrom tunelab.config import TunelabConfig\n", False),
])
def test_the_checker_sees_upward_imports(tmp_path, monkeypatch, source, found):
    fake = tmp_path / "tunelab"
    (fake / "data" / "tools").mkdir(parents=True)
    path = fake / "data" / "tools" / "x.py"
    path.write_text(source)
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert bool(upward_imports(path)) is found
