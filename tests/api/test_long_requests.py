"""A request at the --max-request-tokens cap does not stop other clients from getting tokens (issue #20):
its prompts prefill a bounded chunk per step (--long-prefill-threshold) while short requests are served
in the same steps. Over real HTTP, on a tiny model with the default model's context (8,192)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.helpers.server_process import ServerSpec
from tests.helpers.support import save_tiny_llama

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

CONTEXT = 8192
PROMPTS, PROMPT_TOKENS = 4, 8000  # 32,000 prompt tokens: under the default cap of 4 contexts (32,768)
SHORT_BOUND_S = 30  # what a 2-token request beside it may take, at most (the stall timeout's scale)


@pytest.fixture(scope="module")
def server_spec(tmp_path_factory, tokenizer) -> ServerSpec:
    model = save_tiny_llama(tmp_path_factory.mktemp("long-model"), tokenizer, max_positions=CONTEXT)
    # a small long-prefill chunk makes the long request take many steps even on this tiny model, so the
    # short ones certainly arrive while it is prefilling
    return ServerSpec(model=str(model), extra_args=("--threads", "1", "--long-prefill-threshold", "32"))


def test_short_requests_finish_while_a_request_at_the_cap_prefills(server):
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    big: dict = {}

    def send_big():
        started = time.monotonic()
        r = httpx.post(f"{server.url}/v1/completions", timeout=600, json={
            "model": model, "max_tokens": 1, "prompt": [[100 + i] * PROMPT_TOKENS for i in range(PROMPTS)]})
        big.update(response=r, done=time.monotonic(), took=time.monotonic() - started)

    thread = threading.Thread(target=send_big)
    thread.start()
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/health").json()["running"] == 0:  # the big one is in the batch
        assert time.monotonic() < deadline and thread.is_alive(), big
        time.sleep(0.02)
    shorts = []
    for _ in range(3):
        started = time.monotonic()
        r = httpx.post(f"{server.url}/v1/completions", timeout=SHORT_BOUND_S * 2,
                       json={"model": model, "prompt": "Hello", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2
        shorts.append((time.monotonic() - started, time.monotonic(), thread.is_alive()))
    thread.join(600)
    assert big["response"].status_code == 200, big["response"].text
    assert big["response"].json()["usage"]["prompt_tokens"] == PROMPTS * PROMPT_TOKENS
    print(f"long request ({PROMPTS} x {PROMPT_TOKENS} tokens): {big['took']:.1f} s; 2-token requests "
          f"beside it: {', '.join(f'{took:.2f} s' for took, _, _ in shorts)}")
    # they were served during its prefill, not after it, and each within the bound
    assert shorts[0][1] < big["done"] and shorts[0][2], (shorts, big["took"])
    assert all(took < SHORT_BOUND_S for took, _, _ in shorts), shorts
