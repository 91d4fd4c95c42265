"""``prefixes`` sits below ``server``: none of its modules may import ``server``, at import time or inside a
function (training, which needs both, is its own package above them: ``training/``)."""

from __future__ import annotations

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import prefixes

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: this test process has long since imported ``server`` (conftest does).
PROBE = """
import importlib, json, pkgutil, sys
import prefixes
names = ["prefixes"] + [m.name for m in pkgutil.walk_packages(prefixes.__path__, "prefixes.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "server" or m.startswith("server."))
print(json.dumps({"imported": names, "leaked": leaked}))
"""


def test_no_prefixes_module_imports_server():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {m.name for m in pkgutil.walk_packages(prefixes.__path__, "prefixes.")}
    assert expected <= set(report["imported"])
    assert report["leaked"] == [], f"importing prefixes pulled in {report['leaked']}"


def _imported_names(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):  # every statement, so imports inside functions count too
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_no_prefixes_module_imports_server_even_lazily():
    offenders = {}
    for module in pkgutil.walk_packages(prefixes.__path__, "prefixes."):
        spec = importlib.util.find_spec(module.name)
        assert spec is not None and spec.origin is not None
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        found = [n for n in _imported_names(tree) if n == "server" or n.startswith("server.")]
        if found:
            offenders[module.name] = found
    assert offenders == {}
