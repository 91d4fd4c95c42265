"""The evaluator ``prefix-serve train`` measures exact match with: the serving engine itself, in-process.

It lives here rather than in :mod:`prefixes.training` so that ``prefixes`` never imports ``server``; the
training loop gets it as a plain callable (:class:`prefixes.training.Evaluator`).
"""

from __future__ import annotations

from prefixes.artifact import PrefixArtifact
from prefixes.records import ResidentPrefix
from prefixes.training import EvalPrompt
from server.engine.detokenizer import output_text
from server.engine.engine import Engine
from server.engine.model import BaseModel
from server.engine.sequence import SamplingParams, Sequence


class EngineEvaluator:
    """Greedy generations by an :class:`Engine` over ``base``, the model being trained (its weights are
    frozen and only the prefix changes, so each call sees the latest artifact)."""

    def __init__(self, base: BaseModel):
        self.base = base

    def __call__(self, artifact: PrefixArtifact, prompts: list[EvalPrompt]) -> list[str]:
        artifact.tensor = artifact.tensor.to(self.base.device, self.base.dtype)
        prefix = ResidentPrefix.unstored("eval", artifact)
        # A fresh engine per call: its cache and sampling state belong to this evaluation alone.
        engine = Engine(self.base)
        seqs = [Sequence(p.ids, SamplingParams(max_new_tokens=p.max_new_tokens), prefix) for p in prompts]
        for seq in seqs:
            engine.submit(seq)
        engine.run_until_idle()
        params = SamplingParams()  # no stop strings or stop ids: the whole output
        return [output_text(self.base.tokenizer, seq.output_ids, params) for seq in seqs]
