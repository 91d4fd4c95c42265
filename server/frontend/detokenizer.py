"""One request's output text, made once and incrementally from its token ids (HTTP process only).

The engine process emits token ids; everything textual happens here, once per request:

- **Incremental decoding** (the vLLM V1 / TGI scheme): ``ids[prefix:read]`` is already text, so the new
  text is ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``; decoding from a token back keeps
  tokenizers that drop a leading space at a window start correct, and each call decodes a short window
  instead of the whole output (linear in the output, not quadratic). A window whose text ends in a
  replacement char (a multi-byte character split across tokens) waits for the next token.
- **Stop strings**, looked for only in the characters added since the last look, plus the
  ``len(longest stop) - 1`` characters before them (a stop string can straddle the boundary). A hit cuts
  the text before it (the stop string is not returned) and sets :attr:`Detokenizer.stopped`: the caller
  finishes the request and aborts the engine's copy (tokens the engine produced meanwhile are dropped).
  Until ``min_tokens`` tokens have arrived nothing is looked for (as vLLM: EOS and stop ids are masked
  then too); the first look then covers all the text so far.
- **Hold-back** for streams (:meth:`Detokenizer.read`): the last ``len(longest stop) - 1`` characters, and
  anything from a complete stop string on, are not shown until they cannot turn out to be one.
- A generated id in ``stop_token_ids`` ends the request (the engine stops there) and, like EOS, is left out
  of the text.

Decoding is lazy for requests without stop strings: ids are only collected as they arrive and decoded when
someone reads (a stream's wake-up, or once at the end for a whole reply).
"""

from __future__ import annotations

from collections.abc import Iterable

REPLACEMENT_CHAR = "\ufffd"  # what a token ending inside a multi-byte UTF-8 character decodes to


class Detokenizer:
    """Token ids in, text out: the single text of one generated sequence."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), stop_token_ids: Iterable[int] = (),
                 min_tokens: int = 0):
        self._tokenizer = tokenizer
        self._stop = stop
        self._stop_ids = frozenset(stop_token_ids)
        self._min_tokens = min_tokens
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._ids: list[int] = []  # the ids whose text is the output (a final stop id left out)
        self._count = 0  # every id received
        self._prefix_offset = 0
        self._read_offset = 0  # ids[:read] are in ``_text``
        self._text = ""  # decoded so far, whole characters only
        self._pending = ""  # text of ids[read:] so far, a split character at its end left off
        self._checked = 0  # characters of ``_text`` already searched for stop strings
        self._sent = 0  # characters of ``_text`` returned by :meth:`read`
        self.stopped = False  # a stop string was found: the text ends before it
        self.closed = False  # no more ids will come

    @property
    def text(self) -> str:
        """The text so far (all of it once :meth:`close` ran), cut before a stop string."""
        self._catch_up()
        return self._text

    def feed(self, ids: Iterable[int]) -> bool:
        """Take newly generated ids; returns whether the output now holds a stop string (it ends there)."""
        if self.stopped or self.closed:
            return self.stopped  # the engine's extra tokens after a stop string are not part of the output
        for token in ids:
            self._count += 1
            if token not in self._stop_ids:
                self._ids.append(token)
        if self._stop and self._count >= self._min_tokens:
            self._look_for_stop()
        return self.stopped

    def read(self) -> str:
        """The text that may be shown now and was not returned before (possibly empty)."""
        self._catch_up()
        safe = len(self._text)
        if not (self.stopped or self.closed):
            safe -= self._hold
            # before min_tokens stop strings are not looked for, but the first look will cut at one
            search_from = max(0, self._sent - self._hold)
            for stop in self._stop:
                at = self._text.find(stop, search_from)
                if at >= 0:
                    safe = min(safe, at)
        if safe <= self._sent:
            return ""
        piece = self._text[self._sent:safe]
        self._sent = safe
        return piece

    def close(self) -> None:
        """No more ids come: decode what is left, a split character included (as a whole decode would)."""
        if not self.closed and not self.stopped:
            self._catch_up(final=True)
        self.closed = True

    def add(self, ids: list[int]) -> str:
        """:meth:`feed`, then :meth:`read`: what a stream shows after these ids."""
        self.feed(ids)
        return self.read()

    def finish(self) -> str:
        """:meth:`close`, then the rest of the text not yet returned."""
        self.close()
        return self.read()

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _catch_up(self, final: bool = False) -> None:
        """Move the ids not yet in ``_text`` into it, unless their text ends inside a character."""
        if self.stopped or (self._read_offset == len(self._ids) and not final):
            return
        before = self._decode(self._ids[self._prefix_offset:self._read_offset])
        after = self._decode(self._ids[self._prefix_offset:])
        new = after[len(before):] if len(after) > len(before) else ""
        if final or (new and not after.endswith(REPLACEMENT_CHAR)):
            self._text += new
            self._pending = ""
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        else:
            self._pending = new.rstrip(REPLACEMENT_CHAR)

    def _look_for_stop(self) -> None:
        self._catch_up()
        # the complete characters of a split one's window count too: a stop string may end just before it
        text = self._text + self._pending
        start = max(0, self._checked - self._hold)
        hits = [at for at in (text.find(stop, start) for stop in self._stop) if at >= 0]
        self._checked = len(self._text)
        if hits:
            self._text = text[:min(hits)]
            self._pending = ""
            self.stopped = True


def token_text(tokenizer, token_id: int) -> str:
    """One id's own text, as logprobs show a token (special tokens included; a piece of a multi-byte
    character shows as a replacement char)."""
    return tokenizer.decode([token_id])


def output_text(tokenizer, ids: list[int], params) -> str:
    """The whole text of a finished output, for in-process callers (training's evaluation): what a
    :class:`Detokenizer` fed every id at once makes."""
    detokenizer = Detokenizer(tokenizer, params.stop, params.stop_token_ids, params.min_tokens)
    detokenizer.feed(ids)
    return detokenizer.finish()
