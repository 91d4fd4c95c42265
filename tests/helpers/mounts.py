"""Real small and read-only file systems for storage-fault tests: a tmpfs of a given size (a disk that
fills up: ENOSPC), remountable read-only (EROFS; chmod does not stop root). Needs mount privileges (root
with CAP_SYS_ADMIN); without them the test is skipped, saying why.

    with Tmpfs(tmp_path / "store", size=1 << 20) as fs:
        fs.fill(leave=4096)   # the file system full but one page
        fs.read_only()        # remount ro; fs.writable() remounts rw
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from typing_extensions import Self


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {proc.stderr.strip()}")


class Tmpfs:
    def __init__(self, path: Path, size: int):
        self.path = Path(path)
        self.size = size
        self.filler = self.path / ".filler"
        self._mounted = False

    def __enter__(self) -> Self:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            _mount("-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.path))
        except (OSError, FileNotFoundError) as exc:
            pytest.skip(f"a real small file system is needed and tmpfs cannot be mounted here ({exc})")
        self._mounted = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self._mounted = False

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Write a filler file until the file system is full, then give back ``leave`` bytes of it."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            page = b"\0" * 4096
            while True:
                try:
                    if os.write(fd, page) == 0:
                        break
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
            os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
        finally:
            os.close(fd)
        assert self.free() >= leave, (self.free(), leave)

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        _mount("-o", "remount,ro", str(self.path))

    def writable(self) -> None:
        _mount("-o", "remount,rw", str(self.path))
