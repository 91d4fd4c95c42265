"""The layout a newcomer relies on: folders say which process a module runs in, and no module or function
grows past what one reading takes in (issue 22: 400 lines a file, 80 a function, argparse tables included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The top-level packages, lowest first: prefixes/ (formats, store) imports neither of the others, server/
# imports prefixes/, and training/ (`prefix-serve train`) imports both; only server/cli.py reaches training/.
PACKAGES = ("prefixes", "server", "training")
SOURCES = sorted(p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py"))
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_sources_were_found():
    assert len(SOURCES) > 50 and ROOT / "server" / "engine" / "core.py" in SOURCES
    assert ROOT / "training" / "loop.py" in SOURCES


def test_every_top_level_package_is_known():
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk == set(PACKAGES), "a new top-level package: give it a place in PACKAGES and its rules"


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


def test_prefixes_never_imports_the_server_or_training():
    offenders = {p.relative_to(ROOT).as_posix(): sorted(m for m in _imports(p)
                                                       if _within(m, "server", "training"))
                 for p in (ROOT / "prefixes").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_command_line_reaches_training():
    # training/ imports the engine to measure exact match, so the server reaching it would be a cycle
    offenders = {p.relative_to(ROOT).as_posix(): sorted(m for m in _imports(p) if _within(m, "training"))
                 for p in (ROOT / "server").rglob("*.py") if p != ROOT / "server" / "cli.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
