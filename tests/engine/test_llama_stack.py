"""The Llama-shaped stack (server/engine/llama_stack.py) computes what transformers' layers compute.

The same mixed batch (prefix-tuning, projected prefix, P-Tuning v1 and prompt-tuning rows beside base rows,
prompts chunked across steps, prompt logprobs) runs through two engines on identical models: one with the
stack, one whose runner calls the model's modules. In float32 every logprob must be equal bit for bit; in
bfloat16, with these few rows per step, too (oneDNN blocks a matrix of hundreds of rows differently once its
projections are fused, see cpu_linear.FusedLinear, which these steps never reach).
"""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.engine import Engine, EngineConfig
from server.engine.llama_stack import LlamaStack
from server.engine.model import wrap_model
from server.engine.sequence import SamplingParams
from server.frontend.local_client import LocalEngineClient
from server.frontend.request_state import RequestState
from tests.helpers.support import KINDS, VOCAB, make_adapter, tiny_model


def _model(arch: str, dtype: torch.dtype):
    model = tiny_model(arch).to(dtype)
    if arch == "mistral":  # its tiny config has a window; Mistral reads it from the config at every forward
        model.config.sliding_window = None
    return model


def _run(client: LocalEngineClient, states: list[RequestState]) -> None:
    for state in states[:4]:
        client.submit(state)
    for _ in range(2):
        client.step()
    for state in states[4:]:  # the rest join while the first ones decode
        client.submit(state)
    client.run_until_idle()


def _requests(adapters, seed: int) -> list[RequestState]:
    rng = random.Random(seed)
    seqs = []
    for i in range(9):
        adapter = None if i % 5 == 4 else adapters[i % len(adapters)]
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 14))]
        params = SamplingParams(max_new_tokens=rng.randint(3, 9), ignore_eos=True, logprobs=3,
                                prompt_logprobs=2 if i % 3 == 0 else None)
        seqs.append(RequestState(prompt, params, adapter.prefix if adapter else None))
    return seqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_the_stack_equals_transformers_layers(arch, dtype, tokenizer, tmp_path):
    bases = [wrap_model(_model(arch, dtype), tokenizer, arch) for _ in range(2)]
    # adapters first: PEFT deep-copies the model, which an engine's oneDNN-packed weights do not allow
    requests = [_requests([make_adapter(base, kind, n, tmp_path / f"{i}", seed)
                           for seed, (kind, n) in enumerate(zip(KINDS[:4], [4, 2, 5, 3]))], seed=11)
                for i, base in enumerate(bases)]
    clients = [LocalEngineClient(base, EngineConfig(max_batch_size=5, max_step_tokens=9)) for base in bases]
    assert clients[0].engine.runner.stack is not None, f"{arch} without a window is Llama's arithmetic"
    clients[1].engine.runner.stack = None  # this one calls the model's modules
    runs = []
    for client, states in zip(clients, requests):
        _run(client, states)
        runs.append(states)
    for stacked, modules in zip(*runs):
        assert stacked.error is None and len(stacked.output_ids) == stacked.params.max_new_tokens
        assert stacked.output_ids == modules.output_ids
        assert stacked.output_logprobs == modules.output_logprobs
        assert stacked.prompt_logprobs == modules.prompt_logprobs


def test_other_shapes_keep_transformers_layers(tokenizer):
    """A sliding window (the tiny Mistral has one) or another family: the runner calls the model."""
    for arch in ("mistral", "gpt2", "qwen3"):
        engine = Engine(wrap_model(tiny_model(arch), tokenizer, arch), EngineConfig(max_batch_size=2))
        assert engine.runner.stack is None, arch
    assert LlamaStack.build(tiny_model("llama")) is not None
