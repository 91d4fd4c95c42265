"""Task tensors on their way to the engine process: which ones it holds, and sending the others.

A tensor crosses as a safetensors file on shared memory (/dev/shm), written here and deleted by the engine
once it is on its device; the engine keeps it until told to drop it, so a task crosses once while it stays
hot. This keeps only the refs and sizes (an LRU within ``budget_bytes``), never a tensor.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable

import safetensors.torch

from server.engine import protocol


def prefix_ref(prefix) -> str:
    """The name a task's tensor goes by in the engine: key, version and a digest of its contents."""
    record = prefix.record
    return f"{record.key}@{record.version}#{record.sha256[:16]}"


class PrefixShipper:
    """The task tensors the engine process holds (refs -> bytes, least recently used first)."""

    def __init__(self, budget_bytes: int, send: Callable[[protocol.ToEngine], None]):
        self.budget_bytes = budget_bytes
        self._send = send
        self._held: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0

    def forget_all(self) -> None:
        """A new engine process holds nothing yet."""
        self._held.clear()
        self._bytes = 0

    def ship(self, prefix) -> str:
        """Make sure the engine holds ``prefix``'s tensor; returns the ref requests name it by."""
        ref = prefix_ref(prefix)
        if ref in self._held:
            self._held.move_to_end(ref)
            return ref
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="prefix-serve-", suffix=".safetensors", dir=folder)
        os.close(fd)
        safetensors.torch.save_file({"tensor": prefix.tensor.detach().contiguous().cpu()}, path)
        self._send(protocol.LoadPrefix(ref, path, prefix.kind.value))
        size = prefix.tensor.numel() * prefix.tensor.element_size()
        self._held[ref] = size
        self._bytes += size
        while self._bytes > self.budget_bytes and len(self._held) > 1:
            old, old_size = self._held.popitem(last=False)
            self._bytes -= old_size
            self._send(protocol.DropPrefix(old))
        return ref
