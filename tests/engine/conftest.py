"""Fixtures of the engine's tests."""

from __future__ import annotations

import pytest

from server.engine import cpu_kernels


@pytest.fixture(scope="module")
def _kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture
def fresh_kernels(monkeypatch, _kernel_cache):
    """The C kernels loaded afresh for a test, switched on, from a cache folder of the module's own (one
    build per module, about 3 seconds); afterwards the engine loads them from its own cache again."""
    monkeypatch.setenv("PREFIX_SERVE_CACHE", str(_kernel_cache))
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    cpu_kernels.library.cache_clear()
    yield
    cpu_kernels.library.cache_clear()
