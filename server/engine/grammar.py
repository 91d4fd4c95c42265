"""Structured outputs: a request's ``structured = (kind, spec)`` becomes a grammar, and a per-request matcher
masks the tokens that would leave it.

llguidance rather than xgrammar, by measured cost on the 2-core development CPU (SmolLM2's 49,152-token
vocabulary, a 3-property JSON schema with a 40-character string, 25 tokens of output): llguidance computes a
token mask in 48 us median / 106 us mean / 404 us worst and builds a matcher in under 1 ms with no compile
step; xgrammar needs 4 us median but 217 us mean / 4.4 ms worst per mask, and 0.6 s to compile the schema,
which would stall whoever compiles it. At a decode step of ~100 ms for the batch, either mask is small; the
compile stall and the worst case decided it.

The matchers hold per-request parser state, so they live in the engine (the sampler's row state), never in
``SamplingParams``; grammars are plain strings, cached by (kind, spec).
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.torch
import torch

if TYPE_CHECKING:  # only in llguidance's type stubs
    from llguidance._lib import JsonCompileOptions


class InvalidGrammar(ValueError):
    """The structured-output spec cannot be compiled; the message says what to fix."""


# Limits checked before anything is compiled. llguidance's own limits (``PARSER_LIMITS``) bound the work
# of each mask, but its grammar compiler recurses over rule chains and nesting on the native stack: a Lark
# grammar of 5,000 chained rules (130 KB) crashed the process that compiled it, 2,000 passed. So the source
# is bounded first, each limit named in the refusal, and the HTTP process checks grammars in a child process
# of its own (server/engine/grammar_check.py), where a crash the limits did not foresee loses nothing else.
# PREFIX_SERVE_GRAMMAR_LIMITS="bytes=N,rules=N,nesting=N,enum=N" overrides any of them (an operator's choice;
# the tests raise them to show that a grammar crashing the checker costs only its own request).
_OVERRIDES = {k.strip(): int(v) for k, v in (item.split("=") for item in
                  os.environ.get("PREFIX_SERVE_GRAMMAR_LIMITS", "").split(",") if "=" in item)}
MAX_GRAMMAR_BYTES = _OVERRIDES.get("bytes", 64 << 10)  # Lark grammars, regexes, JSON schemas, choice lists
MAX_GRAMMAR_RULES = _OVERRIDES.get("rules", 1000)  # Lark rules (lines that define one)
MAX_NESTING = _OVERRIDES.get("nesting", 64)  # brackets in a grammar or regex; objects/arrays in a JSON schema
MAX_ENUM = _OVERRIDES.get("enum", 1000)  # values of one JSON-schema enum, or guided_choice entries
PARSER_LIMITS = llguidance.LLParserLimits(max_grammar_size=100_000)


def _nesting(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return deepest


def check_schema_depth(node: object, depth: int = 0) -> None:
    """Raise :class:`InvalidGrammar` for a parsed JSON schema nested past the limit or with a huge enum."""
    if depth > MAX_NESTING:
        raise InvalidGrammar(f"JSON schema nested deeper than {MAX_NESTING} levels (the limit on schema "
                             "depth)")
    if isinstance(node, dict):
        enum = node.get("enum")
        if isinstance(enum, list) and len(enum) > MAX_ENUM:
            raise InvalidGrammar(f"JSON schema enum of {len(enum)} values is over the limit of {MAX_ENUM}")
        for value in node.values():
            check_schema_depth(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            check_schema_depth(value, depth + 1)


def check_limits(kind: str, spec: str) -> None:
    """Raise :class:`InvalidGrammar` naming the limit a structured-output spec is over (nothing compiled)."""
    size = len(spec.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise InvalidGrammar(f"the {kind} for structured output is {size} bytes, over the limit of "
                             f"{MAX_GRAMMAR_BYTES} bytes")
    if kind == "grammar":
        rules = sum(1 for line in spec.splitlines() if _RULE.match(line))
        if rules > MAX_GRAMMAR_RULES:
            raise InvalidGrammar(f"the grammar defines {rules} rules, over the limit of {MAX_GRAMMAR_RULES}")
    if kind in ("grammar", "regex") and _nesting(spec) > MAX_NESTING:
        raise InvalidGrammar(f"the {kind} nests brackets deeper than the limit of {MAX_NESTING}")
    if kind in ("json_schema", "choice"):
        try:
            parsed = json.loads(spec)
        except ValueError as exc:
            raise InvalidGrammar(f"invalid {kind} for structured output: {exc}") from None
        if kind == "choice" and isinstance(parsed, list) and len(parsed) > MAX_ENUM:
            raise InvalidGrammar(f"guided_choice has {len(parsed)} entries, over the limit of {MAX_ENUM}")
        check_schema_depth(parsed)


_RULE = re.compile(r"^\s*[?!]?[A-Za-z_][A-Za-z_0-9]*(\.[0-9]+)?\s*:")


@functools.lru_cache(maxsize=256)
def grammar_source(kind: str, spec: str) -> str:
    """llguidance's grammar (a JSON string) for one structured-output request; cached by (kind, spec)."""
    check_limits(kind, spec)
    # Compact JSON (no free whitespace): otherwise a small model can pad with newlines until max_tokens.
    defaults: JsonCompileOptions = {"whitespace_flexible": False}
    try:
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=defaults)
        if kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=defaults)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            choices = json.loads(spec)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise InvalidGrammar("guided_choice must be a non-empty list of non-empty strings")
            # JSON string literals are valid Lark literals, so any text is matched exactly
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in choices)
            )
        if kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(spec)
    except InvalidGrammar:
        raise
    except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError/RuntimeError/...; any is the client's
        raise InvalidGrammar(f"invalid {kind} for structured output: {exc}") from None
    raise InvalidGrammar(f"unknown structured output kind {kind!r}")


class Grammars:
    """Makes matchers for one tokenizer; the tokenizer's token table (~0.5 s to build) is made on first
    use."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size  # the width of the model's logits, which may exceed the tokenizer's
        self._eos = sorted(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                              eos_token=self._eos)
        return self._ll_tokenizer

    def check(self, structured: tuple[str, str]) -> None:
        """Raise :class:`InvalidGrammar` unless ``structured`` compiles for this tokenizer."""
        source = grammar_source(*structured)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, self.tokenizer,
                                                                               limits=PARSER_LIMITS)
        if failed:
            raise InvalidGrammar(f"invalid {structured[0]} for structured output: {'; '.join(messages)}")

    def matcher(self, structured: tuple[str, str]) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_source(*structured), limits=PARSER_LIMITS)
        if matcher.is_error():
            raise InvalidGrammar(matcher.get_error())
        return matcher

    def allocate_mask(self, rows: int) -> torch.Tensor:
        """[rows, ceil(V / 32)] int32: one bit per token id."""
        return llguidance.torch.allocate_token_bitmask(rows, self.vocab_size)

    @staticmethod
    def fill_mask(matcher: llguidance.LLMatcher, mask: torch.Tensor, index: int) -> None:
        llguidance.torch.fill_next_token_bitmask(matcher, mask, index)
        if matcher.is_error():
            raise InvalidGrammar(f"structured output failed: {matcher.get_error()}")

    @staticmethod
    def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> None:
        """logits: [rows, V] float32, set to -inf in place where ``mask`` [rows, ceil(V / 32)] has a 0 bit."""
        llguidance.torch.apply_token_bitmask_inplace(logits, mask)

    @staticmethod
    def accept(matcher: llguidance.LLMatcher, token: int) -> None:
        if not matcher.consume_token(token):
            raise InvalidGrammar(f"structured output failed: token {token} rejected: {matcher.get_error()}")
