"""Find the system programs the deployment tests start (nginx, prometheus, promtool, redis-server).

``make install`` installs them with apt when it runs as root. Where one is still missing, a test that needs
it fails under CI (``CI`` set) or as root, where its absence is a broken install; as a plain local user,
who cannot install it, it is skipped with the command that would install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Debian keeps daemons in sbin folders, which a non-root PATH often lacks.
_EXTRA_PATH = "/usr/sbin:/usr/local/sbin:/sbin"


def _missing(what: str, package: str) -> None:
    message = (f"{what} is missing: the deployment tests start the real one. `make install` installs it as "
               f"root on Debian; or: apt-get install {package}")
    if os.environ.get("CI") or os.geteuid() == 0:
        pytest.fail(message, pytrace=False)
    pytest.skip(message + " (skipped: not root, so `make install` could not install it)")


def require_program(name: str, package: str) -> str:
    """The path of ``name``; fails or skips (see above) when it is not installed."""
    found = shutil.which(name) or shutil.which(name, path=_EXTRA_PATH)
    if found is None:
        _missing(f"`{name}`", package)
    return found


def require_file(path: str | os.PathLike, package: str) -> Path:
    """A file a package installs (e.g. an nginx module); fails or skips (see above) when it is absent."""
    path = Path(path)
    if not path.exists():
        _missing(str(path), package)
    return path


def stop_process(proc: subprocess.Popen | None, sig: int, grace: float) -> None:
    """Ask ``proc`` to stop with ``sig``; kill it if it has not within ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
