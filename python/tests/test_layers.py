"""The package's layer order (uring_ckpt/__init__.py): each module imports only the modules
before it, never the package facade, and imports inside functions only optional
dependencies."""

from __future__ import annotations

import ast
import pathlib

import uring_ckpt

ROOT = pathlib.Path(uring_ckpt.__file__).parent
ORDER = ["_uring_ckpt", "_errors", "_optional", "_safe_pickle", "_pytree", "_common", "_into", "_api", "_async"]
ORDER += ["_staging", "dcp", "lightning", "__init__"]
SUBPACKAGES = {
    "_safe_pickle": ["_describe", "_reduce", "_allow", "_scan", "_vm", "__init__"],
    "_pytree": ["_format", "_flatten", "_restore", "__init__"],
}
LAZY = {"torch", "ml_dtypes"}  # optional dependencies imported on first use


def _target(node: ast.ImportFrom) -> str:
    return (node.module or "").split(".")[0] or node.names[0].name


def test_each_module_imports_only_the_layers_before_it() -> None:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        layers = SUBPACKAGES[parts[0]] if len(parts) == 2 else ORDER
        if parts[-1] not in layers:
            bad.append(f"{'/'.join(parts)} is in no layer: add it to the order")
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("uring")
            ):
                bad.append(f"{path.name}: absolute import of {node.module}")
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            if len(parts) == 2 and node.level == 1:  # within a subpackage
                layers, me, target = SUBPACKAGES[parts[0]], parts[1], node.module or ""
            else:
                layers, me, target = ORDER, parts[0], _target(node)
            if target not in layers or layers.index(target) >= layers.index(me):
                bad.append(f"{'/'.join(parts)} imports {target}")
    assert not bad, bad


def test_imports_inside_functions_are_optional_dependencies_only() -> None:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom):
                    names = {"." * node.level + (node.module or "")}
                else:
                    continue
                if not names <= LAZY:
                    bad.append(f"{path.name}:{node.lineno} {sorted(names)}")
    assert not bad, bad
