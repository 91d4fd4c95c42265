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

What is built once per process is built at start-up by :meth:`Grammars.warm_up`, before the engine process
reports ready: the token table (~0.4 s; llguidance's from_tokenizer) and a first schema compiled and
followed. Masks are allocated, filled and applied here, in plain torch, not by
``llguidance.torch``: importing it imports dynamo and inductor (3 s of every process start), and its
``apply_token_bitmask_inplace`` is a ``torch.compile`` function, whose first call traced and compiled C++
(2 s with inductor's on-disk cache warm, 19 s with it cold on an idle machine, 81 s seen on a busy one: the
first ``json_schema`` request of a fresh server paid for it, stalling every other request's step) and which
fails outright where no C++ compiler is installed (the slim Docker image). Measured on the 2-core
development CPU for SmolLM2's 49,152 tokens: 40 us for one row, 0.5 ms for 8 and 2.6 ms for 32 (the
compiled kernel: 90 us, 0.2 ms, 0.8 ms), against a decode step of ~100 ms.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import time
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import torch

if TYPE_CHECKING:  # only in llguidance's type stubs
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)


class InvalidGrammar(ValueError):
    """The structured-output spec cannot be compiled; the message says what to fix."""


# Limits checked before anything is compiled. llguidance's own limits (``PARSER_LIMITS``) bound the work
# of each mask, but its grammar compiler recurses over rule chains and nesting on the native stack: a Lark
# grammar of 5,000 chained rules (130 KB) crashed the process that compiled it, 2,000 passed. So the source
# is bounded first, each limit named in the refusal, and the HTTP process checks grammars in a child process
# of its own (server/frontend/grammar_check.py), where a crash the limits did not foresee loses nothing else.
# PREFIX_SERVE_GRAMMAR_LIMITS="bytes=N,rules=N,nesting=N,enum=N" overrides any of them (an operator's choice;
# the tests raise them to show that a grammar crashing the checker costs only its own request).
_OVERRIDES = {k.strip(): int(v) for k, v in (item.split("=") for item in
                  os.environ.get("PREFIX_SERVE_GRAMMAR_LIMITS", "").split(",") if "=" in item)}
MAX_GRAMMAR_BYTES = _OVERRIDES.get("bytes", 64 << 10)  # Lark grammars, regexes, JSON schemas, choice lists
MAX_GRAMMAR_RULES = _OVERRIDES.get("rules", 1000)  # Lark rules (lines that define one)
MAX_NESTING = _OVERRIDES.get("nesting", 64)  # brackets (grammar, regex); objects/arrays of a schema, via $ref
MAX_ENUM = _OVERRIDES.get("enum", 1000)  # values of one JSON-schema enum, or guided_choice entries
# llguidance's own limits, every one set here rather than left to the library's defaults (1.9.1's in
# brackets), so that an upgrade cannot loosen them unseen. Past one, compiling or a mask step fails with an
# error naming it: a 400 at the check, or that one request ended with "structured output failed".
PARSER_LIMITS = llguidance.LLParserLimits(
    # symbols in the compiled grammar [500,000]: what MAX_GRAMMAR_BYTES of Lark or JSON schema compiles to
    # stays far below; a fifth of the default bounds the compile's memory and time should a small source
    # expand (a regex or schema whose expansion multiplies it)
    max_grammar_size=100_000,
    # alternatives of one grammar row [2,000]: the largest legitimate row is a guided_choice or enum of
    # MAX_ENUM (1,000) values; twice that and no more, since Earley work grows with the row
    max_items_in_row=2_000,
    # lexer work building a grammar's regexes at compile time [1,000,000; ~50k/ms: ~20 ms]: the engine builds
    # a matcher per structured request on its step thread, so a compile must not hold the batch longer
    initial_lexer_fuel=1_000_000,
    # lexer work per token mask [200,000; ~14k/ms: ~14 ms]: half the default, ~7 ms per row, as every
    # structured row's mask is computed inside the shared decode step (~100 ms); the worst legitimate mask
    # measured took 0.4 ms (module docstring), so 16 times that is left
    step_lexer_fuel=100_000,
    # Earley items per mask step [50,000; ~20k/ms: ~2.5 ms]: the library's value keeps a mask step small
    # next to the decode step already; ambiguous grammars past it fail instead of slowing every row
    step_max_items=50_000,
    # lexer (DFA) states built lazily per matcher [250,000; 1-2 KB each: up to 500 MB]: a fifth, up to
    # ~100 MB per structured row, as the engine holds one matcher per row (32 rows: 3 GB, not 16); a regex
    # that explodes a DFA ([ab]*a[ab]{18}) and a 20-pattern JSON schema followed for 30 tokens stayed under
    # 20,000 states
    max_lexer_states=50_000,
    # large regexes run on the whole token trie while the lexer is built [True]: compile time (bounded by
    # initial_lexer_fuel) bought back in every mask
    precompute_large_lexemes=True,
    # parser state and grammar excerpts in errors [True]: an error goes back to the tenant who sent that
    # grammar, and the excerpt says what to fix
    verbose_errors=True,
)


def _nesting(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(0, depth - 1)
    return deepest


def _resolve(root: object, ref: str) -> object | None:
    """The subschema a local ``$ref`` (``#``, ``#/$defs/name``, any JSON pointer) names in ``root``; None for
    another document's or one that names nothing (the compiler then refuses it)."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


_CLOSE, _OPEN = object(), object()


def _too_deep() -> InvalidGrammar:
    return InvalidGrammar(f"JSON schema nested deeper than {MAX_NESTING} levels (the limit on schema depth, "
                          "counted through $ref)")


def _check_enum(enum: object) -> None:
    if isinstance(enum, list) and len(enum) > MAX_ENUM:
        raise InvalidGrammar(f"JSON schema enum of {len(enum)} values is over the limit of {MAX_ENUM}")


def check_schema_depth(schema: object) -> None:
    """Raise :class:`InvalidGrammar` for a parsed JSON schema nested past the limit or with a huge enum.

    Depth is counted through local ``$ref`` s, as the compiler recurses into them: 1,000 ``$defs`` each
    referring to the next (57 KB, 6 levels of JSON) crashed llguidance, 800 passed. A ``$ref`` back into
    the chain that leads to it is recursion, which the compiler follows lazily: it adds nothing. Iterative,
    each ``$ref`` 's depth measured once: an operator's raised limit cannot exhaust Python's stack either."""
    heights: dict[str, int] = {}  # a $ref followed -> how far below its target the schema goes
    deepest = [0]  # per $ref being followed (the root's first): the deepest level reached inside it
    todo: list[tuple] = [(schema, 0, frozenset())]
    while todo:
        node, depth, path = todo.pop()
        if node is _OPEN:
            deepest.append(depth)
            continue
        if node is _CLOSE:
            inner = deepest.pop()
            heights[path] = inner - depth  # path: here, the $ref
            deepest[-1] = max(deepest[-1], inner)
            continue
        if depth > MAX_NESTING:
            raise _too_deep()
        deepest[-1] = max(deepest[-1], depth)
        if isinstance(node, dict):
            _check_enum(node.get("enum"))
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in path:
                if ref in heights:
                    if depth + 1 + heights[ref] > MAX_NESTING:
                        raise _too_deep()
                    deepest[-1] = max(deepest[-1], depth + 1 + heights[ref])
                elif (target := _resolve(schema, ref)) is not None:
                    below = depth + 1
                    todo += [(_CLOSE, below, ref), (target, below, path | {ref}), (_OPEN, below, ref)]
            todo += [(value, depth + 1, path) for value in node.values()]
        elif isinstance(node, list):
            todo += [(value, depth + 1, path) for value in node]


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


assert sys.byteorder == "little", "apply_token_mask reads each int32 mask word as 4 little-endian bytes"
# byte value -> its 8 bits as additive logit penalties: [256, 8], 0 where bit j is set (allowed), else -inf
_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()  # [256, 8]: bit j of each byte value
_BYTE_PENALTIES = torch.where(_BITS, 0.0, float("-inf"))
_penalties_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def apply_token_mask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """logits: [rows, V]; mask: int32 [rows, W] with W = ceil(V / 32), bit ``t % 32`` of word ``t // 32`` set
    where token ``t`` is allowed (llguidance's layout, filled on the CPU). Disallowed logits become -inf in
    place.

    A word's 4 bytes, little-endian, hold tokens ``32w .. 32w + 31`` in order, so looking every byte up in a
    [256, 8] table of penalties (0 or -inf) lays out one penalty per token: [rows, 32 W], added to the logits.
    One gather and one add, with no [rows, V] integer or boolean temporaries (those made masked_fill_ ten
    times slower)."""
    rows, vocab = logits.shape
    key = (logits.device, logits.dtype)
    table = _penalties_on.get(key)
    if table is None:
        table = _penalties_on[key] = _BYTE_PENALTIES.to(device=logits.device, dtype=logits.dtype)
    data = mask.to(logits.device, non_blocking=True).contiguous().view(torch.uint8).flatten()  # [rows * 4W]
    penalties = table.index_select(0, data.long()).view(rows, -1)  # [rows, 32 W]
    logits.add_(penalties[:, :vocab])


# What the warm-up compiles and follows: a JSON schema, the kind whose first request paid for the warm-up
WARM_UP_GRAMMAR = ("json_schema", '{"type": "object", "properties": {"n": {"type": "integer"}}}')


class Grammars:
    """Makes matchers for one tokenizer; the tokenizer's token table (~0.5 s to build) is made on first
    use, or by :meth:`warm_up`."""

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
        # A grammar can be valid and allow nothing: $refs that only lead to each other never reach a schema.
        # Its first mask is where the engine would fail, mid-request (a 500); here it is a 400.
        matcher = self.matcher(structured)
        mask = torch.full((1, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * mask.element_size())
        if matcher.is_error() or not mask.any():
            reason = matcher.get_error().split("\n", 1)[0] if matcher.is_error() else "no token allowed"
            raise InvalidGrammar(f"the {structured[0]} for structured output allows no output ({reason})")

    def matcher(self, structured: tuple[str, str]) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar_source(*structured), limits=PARSER_LIMITS)
        if matcher.is_error():
            raise InvalidGrammar(matcher.get_error())
        return matcher

    def allocate_mask(self, rows: int) -> torch.Tensor:
        """[rows, ceil(V / 32)] int32 on the CPU: one bit per token id, all set. Pinned where a GPU may take
        it, so that its copy there overlaps."""
        shape = (rows, (self.vocab_size + 31) // 32)
        if torch.cuda.is_available():
            try:
                return torch.full(shape, -1, dtype=torch.int32, pin_memory=True)
            except RuntimeError:  # no page-locked memory to be had: a plain copy is only slower
                pass
        return torch.full(shape, -1, dtype=torch.int32)

    @staticmethod
    def fill_mask(matcher: llguidance.LLMatcher, mask: torch.Tensor, index: int) -> None:
        """Write ``matcher``'s next-token mask into row ``index`` of ``mask`` (all of the row is written)."""
        row = mask[index]
        assert mask.is_cpu and mask.dtype == torch.int32 and row.is_contiguous(), "a row of allocate_mask"
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if matcher.is_error():
            raise InvalidGrammar(f"structured output failed: {matcher.get_error()}")

    @staticmethod
    def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> None:
        """logits: [rows, V], set to -inf in place where ``mask`` [rows, ceil(V / 32)] has a 0 bit."""
        apply_token_mask(logits, mask)

    @staticmethod
    def accept(matcher: llguidance.LLMatcher, token: int) -> None:
        if not matcher.consume_token(token):
            raise InvalidGrammar(f"structured output failed: token {token} rejected: {matcher.get_error()}")

    def warm_up(self, device: torch.device | str) -> float:
        """Do now, once, what the first structured request would otherwise pay for; returns the seconds.

        The token table, then a JSON schema checked, compiled into a matcher, and its first mask filled and
        applied to float32 logits (the sampler's) on ``device``."""
        start = time.monotonic()
        self.check(WARM_UP_GRAMMAR)
        masks = self.allocate_mask(1)  # [1, ceil(V / 32)], on the CPU
        self.fill_mask(self.matcher(WARM_UP_GRAMMAR), masks, 0)
        logits = torch.zeros(1, self.vocab_size, device=device)  # [1, V]
        self.apply_mask(logits, masks)
        if not torch.isinf(logits).any():
            raise RuntimeError("grammar warm-up: the mask of a JSON schema allowed every token")
        seconds = time.monotonic() - start
        log.info("structured outputs warmed up in %.1fs: the token table of %d tokens built, a JSON schema "
                 "compiled and its first mask applied on %s", seconds, self.vocab_size, device)
        return seconds
