"""The evaluator ``prefix-serve train`` measures exact match with: the serving engine itself, in-process.

It lives here rather than in :mod:`prefixes.training` so that ``prefixes`` never imports ``server``; the
training loop gets it as a plain callable (:class:`prefixes.training.Evaluator`).
"""

from __future__ import annotations

from prefixes.artifact import PrefixArtifact
from prefixes.records import ResidentPrefix
from prefixes.training import EvalPrompt
from server.engine.model import BaseModel
from server.engine.sequence import SamplingParams
from server.frontend.local_client import LocalEngineClient
from server.frontend.request_state import RequestState


class EngineEvaluator:
    """Greedy generations by an engine over ``base``, the model being trained (its weights are frozen and
    only the prefix changes, so each call sees the latest artifact), through the same client verbs and
    text as a served request (:class:`LocalEngineClient`)."""

    def __init__(self, base: BaseModel):
        self.base = base

    def __call__(self, artifact: PrefixArtifact, prompts: list[EvalPrompt]) -> list[str]:
        artifact.tensor = artifact.tensor.to(self.base.device, self.base.dtype)
        prefix = ResidentPrefix.unstored("eval", artifact)
        # A fresh engine per call: its cache and sampling state belong to this evaluation alone.
        client = LocalEngineClient(self.base)
        states = [RequestState(p.ids, SamplingParams(max_new_tokens=p.max_new_tokens), prefix)
                  for p in prompts]
        for state in states:
            client.check_fits(state)
            client.submit(state)
        client.run_until_idle()
        return [state.text for state in states]
