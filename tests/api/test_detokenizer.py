"""The front end's one detokenizer per request (server/frontend/detokenizer.py), and the engine that no longer
makes text: stop strings are found in the new characters only, the engine never decodes.

Fast: the real tokenizer and a tiny random Llama; no server.
"""

from __future__ import annotations

import pytest

from server.engine.engine import Engine, EngineConfig
from server.engine.model import wrap_model
from server.engine.sequence import FinishReason, SamplingParams, Sequence
from server.frontend.detokenizer import Detokenizer, output_text
from tests.helpers.support import tiny_model

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
        "日本語 😀 naïve — ok. ") * 6


class CountingTokenizer:
    """The real tokenizer, counting how many ids each decode is given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded_ids = 0

    def decode(self, ids, **kwargs):
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def _whole(tokenizer, ids: list[int], stop: tuple[str, ...]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(hits)] if hits else text


def test_stop_strings_are_looked_for_in_the_new_text_only(tokenizer):
    """Fed one id at a time with stop strings, the work is linear in the output: each id is decoded a small
    number of times (a whole decode per token, as before, would decode ~n^2/2 ids)."""
    ids = tokenizer(TEXT)["input_ids"]
    counting = CountingTokenizer(tokenizer)
    detok = Detokenizer(counting, ("never appears", "nor this"))
    for token in ids:
        assert not detok.feed([token])
    assert detok.finish() == _whole(tokenizer, ids, ())
    assert counting.decoded_ids < 8 * len(ids), (counting.decoded_ids, len(ids))


@pytest.mark.parametrize("stop", [("fox",), ("dog. Pack",), ("😀",), ("jugs!", "quick")])
def test_the_stop_string_found_incrementally_is_the_whole_decode_s_first(tokenizer, stop):
    ids = tokenizer(TEXT)["input_ids"]
    detok = Detokenizer(tokenizer, stop)
    for n, token in enumerate(ids, 1):
        if detok.feed([token]):
            break
    assert detok.stopped
    # it stops at the first token whose text completes a stop string, and cuts the text as a whole decode
    assert _whole(tokenizer, ids[:n], stop) != tokenizer.decode(ids[:n], skip_special_tokens=True)
    assert _whole(tokenizer, ids[:n - 1], stop) == tokenizer.decode(ids[:n - 1], skip_special_tokens=True)
    assert detok.finish() == _whole(tokenizer, ids[:n], stop)
    assert detok.feed(ids[n:n + 2]) and detok.text == _whole(tokenizer, ids[:n], stop)  # extra ids dropped


def test_before_min_tokens_no_stop_then_the_first_look_covers_everything(tokenizer):
    ids = tokenizer("Paris is nice, very nice indeed")["input_ids"]
    detok = Detokenizer(tokenizer, ("Paris",), min_tokens=4)
    assert [detok.feed([t]) for t in ids[:3]] == [False] * 3
    assert detok.read() == ""  # held back: a stop string will cut it
    assert detok.feed(ids[3:4]) and detok.finish() == ""


def test_a_stop_id_ends_the_text_unseen_and_a_split_character_waits(tokenizer):
    ids = tokenizer("naïve 😀 ok")["input_ids"]
    stop_id = ids[-1]
    detok = Detokenizer(tokenizer, stop_token_ids=(stop_id,))
    shown = [detok.add([t]) for t in ids]
    assert not any("\ufffd" in piece for piece in shown)
    assert "".join(shown) + detok.finish() == tokenizer.decode(ids[:-1]) == output_text(
        tokenizer, ids, SamplingParams(stop_token_ids=(stop_id,)))


def test_the_engine_never_decodes_even_with_stop_strings(tokenizer):
    """Stop strings are the front end's: the engine generates through them, and never calls decode."""
    base = wrap_model(tiny_model("llama", seed=3), tokenizer, "llama")
    engine = Engine(base, EngineConfig(max_batch_size=2, kv_cache_bytes=8 << 20, max_step_tokens=64))

    def refuse(*args, **kwargs):
        raise AssertionError("the engine decoded text")

    base.tokenizer.decode = refuse  # type: ignore[method-assign]
    try:
        seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=12, stop=("e", " ", "a"), ignore_eos=True))
        engine.submit(seq)
        engine.run_until_idle()
    finally:
        del base.tokenizer.decode
    assert len(seq.output_ids) == 12  # to its length, through the stop strings (the engine keeps no finish)


def test_the_in_process_client_follows_requests_as_the_served_one(tokenizer):
    """LocalEngineClient: the same RequestState, detokenizer and tracker as EngineClient, over an engine in
    this process. A stop string ends the request at the token that completes it and cancels the engine's
    copy; the text is the whole decode cut before it."""
    from server.frontend.local_client import LocalEngineClient
    from server.frontend.request_state import RequestState

    base = wrap_model(tiny_model("llama", seed=3), tokenizer, "llama")
    config = EngineConfig(max_batch_size=2, kv_cache_bytes=8 << 20, max_step_tokens=64)
    free = Sequence([1, 2, 3], SamplingParams(max_new_tokens=24, ignore_eos=True))
    engine = Engine(base, config)
    engine.submit(free)
    engine.run_until_idle()
    text = tokenizer.decode(free.output_ids, skip_special_tokens=True)
    stop = text[len(text) // 2:][:2]  # two characters from the middle of what it generates anyway
    assert stop and len(text) > 4

    client = LocalEngineClient(base, config)
    stopped = RequestState([1, 2, 3], SamplingParams(max_new_tokens=24, ignore_eos=True, stop=(stop,)))
    whole = RequestState([1, 2, 3], SamplingParams(max_new_tokens=24, ignore_eos=True))
    for state in (stopped, whole):
        client.check_fits(state)
        client.submit(state)
    client.run_until_idle()
    assert whole.finish_reason is FinishReason.LENGTH and whole.output_ids == free.output_ids
    assert whole.text == text
    assert stopped.finish_reason is FinishReason.STOP and stopped.text == text[:text.find(stop)]
    n = len(stopped.output_ids)
    assert stopped.output_ids == free.output_ids[:n] and n < len(free.output_ids)
    assert stop in tokenizer.decode(free.output_ids[:n])
    assert stop not in tokenizer.decode(free.output_ids[:n - 1])
    assert not client.engine.num_running and not client.engine.num_waiting  # the stopped row was cancelled
