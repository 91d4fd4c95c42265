from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.model import default_model_dir, load_base_model


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's real tokenizer (tiny random models share it; their ids are a subset)."""
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="session")
def default_model():
    """The real embedded default model, float32 on CPU, loaded once per test session."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_base_model("default", torch.float32, "cpu")
