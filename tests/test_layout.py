"""The layout a newcomer relies on: folders say which process a module runs in, and no module or function
grows past what one reading takes in (issue 22: 400 lines a file, 80 a function, argparse tables included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("server", "prefixes") for p in (ROOT / folder).rglob("*.py"))
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_sources_were_found():
    assert len(SOURCES) > 50 and ROOT / "server" / "engine" / "core.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_file_or_function_is_too_long(path):
    source = path.read_text(encoding="utf-8")
    assert source.count("\n") <= MAX_FILE_LINES, f"{path.name}: split it by concern"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_engine_process_never_imports_the_front_end():
    # server/engine/ is what runs in the engine process (plus the protocol both sides import); the
    # HTTP process's side of it is server/frontend/, and the routes are server/api/
    offenders = {p.relative_to(ROOT).as_posix(): sorted(m for m in _imports(p)
                                                       if m.startswith(("server.frontend", "server.api")))
                 for p in (ROOT / "server" / "engine").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_prefixes_never_imports_the_server():
    offenders = {p.relative_to(ROOT).as_posix(): sorted(m for m in _imports(p) if m.startswith("server"))
                 for p in (ROOT / "prefixes").rglob("*.py")}
    # training evaluates through an injected evaluator (server/training_eval.py), so even it needs none
    assert {k: v for k, v in offenders.items() if v} == {}
