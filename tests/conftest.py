"""Fixtures shared by every test folder: the default model's tokenizer and model, and the real server."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from server.engine.model import default_model_dir, load_base_model
from tests.helpers.server_process import ServerProcess, ServerSpec

# Engines built in the test process run as a served one does on these 2-core machines (one torch thread,
# ServerSettings.engine_threads): so the CPU kernels, which apply to one-thread engines only
# (server/engine/cpu_kernels.py), are what the oracle tests check against PEFT.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (tiny random models share it; their ids are a subset)."""
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model, float32 on CPU, loaded once per test session."""
    return load_base_model("default", torch.float32, "cpu")


@pytest.fixture(scope="module")
def server_spec() -> ServerSpec:
    """How this module's ``server`` starts; a module overrides this fixture to add an auth file, options,
    a model or uploads (see ServerSpec)."""
    return ServerSpec()


@pytest.fixture(scope="module")
def server(request, server_spec: ServerSpec, tmp_path_factory) -> Iterator[ServerProcess]:
    """The real server (a ``python -m server.cli serve`` process) for the test module, on a fresh store in a
    temporary folder, started as ``server_spec`` says and stopped after the module's last test."""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    args: tuple[str, ...] = ()
    if server_spec.auth is not None:
        auth_file = root / "auth.json"
        auth_file.write_text(json.dumps(server_spec.auth))
        args = ("--auth-file", str(auth_file))
    with ServerProcess(root / "store", root / "server.log", model=server_spec.model,
                       extra_args=args + server_spec.extra_args, startup_timeout=server_spec.startup_timeout,
                       stop_timeout=server_spec.stop_timeout) as proc:
        for task, files in server_spec.uploads.items():
            r = httpx.post(f"{proc.url}/prefixes/{task}", headers=server_spec.upload_headers,
                           files=[("files", (n, b)) for n, b in files.items()])
            assert r.status_code == 201, r.text
        yield proc
        if server_spec.clean_log:
            assert "Traceback" not in proc.log_text(), proc.log_tail()
