"""Import boundaries: the engine and auth do not pull in the store or Redis; prefixes/ does not import server.

Each check imports in a fresh interpreter, so what the test process already imported cannot hide a leak.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_engine_and_auth_import_neither_the_store_nor_redis():
    # torch imports redis when it is installed (an optional cache backend), so "not in sys.modules" cannot
    # tell; blocking it can: any import of redis now raises ImportError, which torch tolerates and the
    # store's Redis tier would not.
    run("import sys\n"
        "sys.modules['redis'] = None\n"
        "import server.engine.engine, server.engine.core, server.engine.sequence, server.auth\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[:2] == ['prefixes', 'store'])\n"
        "assert not leaked, leaked\n")


def test_prefixes_do_not_import_server():
    # prefixes.training still imports the engine to evaluate (being replaced by an injected evaluator).
    run("import pkgutil, importlib, sys\n"
        "import prefixes\n"
        "names = [m.name for m in pkgutil.walk_packages(prefixes.__path__, 'prefixes.')\n"
        "         if m.name != 'prefixes.training']\n"
        "assert 'prefixes.store.store' in names, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'server' or m.startswith('server.'))\n"
        "assert not leaked, leaked\n")
