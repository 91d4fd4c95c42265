"""Import boundaries: the engine and auth do not pull in the store or Redis (that prefixes/ does not import
server is tests/prefixes/test_imports.py).

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

