"""The grammar checker process alone (server/frontend/grammar_check.py): its verdicts are remembered, a
timeout's is not, and a worker that is gone is replaced only when a new spec needs it."""

from __future__ import annotations

import asyncio
import json

import pytest
from transformers import AutoConfig

from server.engine.model import default_model_dir
from server.frontend.grammar_check import GrammarChecker

OBJECT = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
# $refs that lead only to each other: a schema that allows no output, which the first mask finds
ALIASES = json.dumps({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})


@pytest.fixture(scope="module")
def checker():
    folder = default_model_dir()
    config = AutoConfig.from_pretrained(folder)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    grammars = GrammarChecker(str(folder), config.vocab_size, frozenset(eos))
    grammars.start()
    yield grammars
    grammars.close()


def check(checker: GrammarChecker, kind: str, spec: str) -> str | None:
    return asyncio.run(checker.check(kind, spec))


def test_verdicts_are_remembered_and_a_new_spec_restarts_a_worker_that_is_gone(checker):
    assert check(checker, "json_schema", OBJECT) is None
    refused = check(checker, "json_schema", ALIASES)
    assert refused is not None and "no output" in refused, refused
    checker._proc.kill()  # from here on, only remembered verdicts can answer without a new worker
    checker._proc.join(5)
    assert check(checker, "json_schema", OBJECT) is None
    assert check(checker, "json_schema", ALIASES) == refused
    assert not checker._proc.is_alive() and checker.restarts == 0
    other = json.dumps({"type": "array", "items": {"type": "string"}})
    assert check(checker, "json_schema", other) is None  # needed the worker: a new one was started
    assert checker._proc.is_alive()


def test_a_timeout_is_not_remembered(checker):
    spec = json.dumps({"type": "object", "properties": {"t": {"type": "string", "maxLength": 7}}})
    restarts, timeout = checker.restarts, checker.timeout
    # no wait at all: the answer cannot be back the instant the spec is sent (a 0.1 ms wait was once enough
    # for this small schema on a quiet machine, and the test failed)
    checker.timeout = 0.0
    try:
        said = check(checker, "json_schema", spec)
    finally:
        checker.timeout = timeout
    assert said is not None and "took over" in said, said
    assert checker.restarts == restarts + 1
    assert check(checker, "json_schema", spec) is None  # asked again, and it compiles
