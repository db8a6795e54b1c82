"""The house's limits (issue 27): short functions and files in the engine and the app, and no `sys.path` edits in
bench/, tools/ or tests/ (they find their shared helpers as one importable package)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"blended": 80, "ui": 150}  # lines per function
MAX_FILE_LINES = 450


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_no_function_or_file_is_over_the_limits():
    over = []
    for folder, limit in LIMITS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = len(path.read_text().splitlines())
            if lines > MAX_FILE_LINES:
                over.append(f"{path.relative_to(ROOT)}: {lines} lines")
            over += [f"{path.relative_to(ROOT)}:{name}: {n} lines" for name, n in _functions(path) if n > limit]
    assert not over, "\n".join(over)


def test_bench_tools_and_tests_edit_no_sys_path():
    found = [f"{p.relative_to(ROOT)}" for folder in ("bench", "tools", "tests", "assets")
             for p in sorted((ROOT / folder).rglob("*.py"))
             if "sys.path" in p.read_text() and p.name != "test_house.py"]
    assert not found, found


def _private_names(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_bench_reaches_no_private_name_of_the_engine():
    engine = _private_names(ROOT / "blended") - _private_names(ROOT / "bench")
    found = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in engine:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blended") \
                    and any(a.name.startswith("_") for a in node.names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import of a private name")
    assert not found, "\n".join(found)
