"""How ``prefix-serve train`` measures exact match: greedy generations by the serving engine itself,
in-process, so the number printed is what the server will do."""

from __future__ import annotations

from dataclasses import dataclass

from prefixes.artifact import PrefixArtifact
from prefixes.records import ResidentPrefix
from server.engine.model import BaseModel
from server.engine.sequence import SamplingParams
from server.frontend.local_client import LocalEngineClient
from server.frontend.request_state import RequestState


@dataclass(frozen=True, slots=True)
class EvalPrompt:
    ids: list[int]  # the prompt's token ids
    max_new_tokens: int


def greedy_generations(base: BaseModel, artifact: PrefixArtifact, prompts: list[EvalPrompt]) -> list[str]:
    """Greedy generations with ``artifact`` as the task's prefix: one text per prompt, in order, each ending
    at EOS or after ``max_new_tokens``. The engine runs over ``base``, the model being trained (its weights
    are frozen and only the prefix changes, so each call sees the latest artifact), through the same client
    verbs and text as a served request (:class:`LocalEngineClient`)."""
    artifact.tensor = artifact.tensor.to(base.device, base.dtype)
    prefix = ResidentPrefix.unstored("eval", artifact)
    # A fresh engine per call: its cache and sampling state belong to this evaluation alone.
    client = LocalEngineClient(base)
    states = [RequestState(p.ids, SamplingParams(max_new_tokens=p.max_new_tokens), prefix) for p in prompts]
    for state in states:
        client.check_fits(state)
        client.submit(state)
    client.run_until_idle()
    return [state.text for state in states]
