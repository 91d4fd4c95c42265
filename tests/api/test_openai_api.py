"""The OpenAI-compatible API (/v1) and streaming, through the real ``openai`` client and raw httpx.

The incremental detokenizer is tested directly first (fast); the rest runs against one real server process
(marked slow) with an auth file, so that tenants, task ownership and the concurrency limit are exercised
too: tenant ``acme`` owns the uploaded task, tenant ``solo`` may have one request in flight.

Run: PREFIX_SERVE_CACHE=/tmp/pscache .venv/bin/python -m pytest -q tests/api/test_openai_api.py
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from server.frontend.detokenizer import REPLACEMENT_CHAR, Detokenizer
from tests.helpers.adapters import peft_adapter
from tests.helpers.server_process import ServerSpec

slow = pytest.mark.slow

PROMPT = "The capital of France is"
MULTIBYTE_PROMPT = "héllo 日本語 😀"  # the base model answers it with full-width characters
TASK = "pre"
KEYS = {"acme": "key-acme", "solo": "key-solo"}


# ---------------------------------------------------------------------------------------------------------
# The incremental detokenizer, against a whole decode of the output cut at the first stop string


def _stream_like_engine(tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[list[str], str]:
    """Feed ``ids`` one at a time, finishing where a whole decode (cut at the first stop string) says the
    output ends. Returns the detokenizer's deltas (the last one its rest) and that reference text."""
    detok, deltas = Detokenizer(tokenizer, stop), []
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        final = text[:min(hits)] if hits else (text if n == len(ids) else None)
        deltas.append(detok.add(ids[n - 1:n]))
        if final is not None:
            assert detok.stopped == bool(hits)  # it found the stop string at the same token
            deltas.append(detok.finish())
            return deltas, final
    raise AssertionError("unreachable")


@pytest.mark.parametrize("text", ["héllo 日本語 😀 wörld", "！！？ 🇫🇷 naïve — ok",
                                  "plain ascii, no surprises"])
def test_detokenizer_never_splits_a_character(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    deltas, final = _stream_like_engine(tokenizer, ids, ())
    assert final == text
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


@pytest.mark.parametrize("text, stop", [
    ("Paris.\n\nThe answer is: 2019", ("\n\n",)),
    ("Paris.\n\nThe answer is: 2019", ("answer", "is:")),
    ("Paris.\n\nThe answer is: 2019", ("nothing like it",)),
    ("日本語 😀 wörld", ("😀",)),
    ("The cat sat on the mat", ("at o", "mat")),
    ("Paris is nice", ("Paris",)),  # the stop string at the very start
])
def test_detokenizer_never_shows_text_past_a_stop_string(tokenizer, text, stop):
    ids = tokenizer(text)["input_ids"]
    deltas, final = _stream_like_engine(tokenizer, ids, stop)
    shown_before_end = "".join(deltas[:-1])
    assert final.startswith(shown_before_end)
    assert "".join(deltas) == final
    assert not any(s in final for s in stop)


# ---------------------------------------------------------------------------------------------------------
# The server, an uploaded task, clients


@pytest.fixture(scope="module")
def prefix_adapter(tmp_path_factory) -> dict[str, bytes]:
    """A real PEFT prefix-tuning adapter for the default model, scaled so that it changes greedy output."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from server.engine.model import default_model_dir

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(1234)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(default_model_dir()))
    _, files = peft_adapter(base, "prefix", out, seed=None, scale=5.0, num_virtual_tokens=8)
    return {name: files[name] for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def server_spec(prefix_adapter) -> ServerSpec:
    auth = {"tenants": {
        "acme": {"api_keys": [KEYS["acme"]]},
        "solo": {"api_keys": [KEYS["solo"]], "max_concurrent_requests": 1},
    }}
    return ServerSpec(auth=auth, extra_args=("--public-metrics",), uploads={TASK: prefix_adapter},
                      upload_headers=_auth("acme"), startup_timeout=300, stop_timeout=10)


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["acme"], max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_id(server) -> str:
    return httpx.get(server.url + "/healthz").json()["model"]


def _generate(server, task: str | None, prompt: str, **params) -> dict:
    r = httpx.post(server.url + "/generate", params={"task": task} if task else {}, headers=_auth("acme"),
                   json={"prompt": prompt, **params}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _sse(response: httpx.Response) -> list:
    """The ``data:`` payloads of an SSE response, JSON-decoded ("[DONE]" kept as is); checks the framing."""
    events = []
    for block in response.read().decode().split("\n\n"):
        if block:
            assert block.startswith("data: ") and "\n" not in block, block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _metric(server, outcome: str, tenant: str) -> float:
    needle = f'prefix_serve_requests_total{{outcome="{outcome}",tenant="{tenant}"}} '
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(needle):
            return float(line[len(needle):])
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# Models and whole responses


@slow
def test_models_list_has_the_base_model_and_the_task(client, server, base_id):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {base_id, TASK}
    task = models[TASK]
    assert (task.object, task.parent, task.owned_by) == ("model", base_id, "acme")
    assert models[base_id].parent is None
    assert client.models.retrieve(TASK).id == TASK
    # another tenant sees the base model only
    r = httpx.get(server.url + "/v1/models", headers=_auth("solo"))
    assert r.json()["object"] == "list" and [m["id"] for m in r.json()["data"]] == [base_id]


@slow
def test_completion_with_a_task_equals_generate(client, server):
    completion = client.completions.create(model=TASK, prompt=PROMPT, max_tokens=12, temperature=0)
    reference = _generate(server, TASK, PROMPT, max_new_tokens=12)
    assert reference["text"] != _generate(server, None, PROMPT, max_new_tokens=12)["text"]  # the task matters
    [choice] = completion.choices
    assert choice.text == reference["text"]
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, reference["finish_reason"], None)
    assert completion.object == "text_completion" and completion.model == TASK
    prompt_tokens = reference["usage"]["prompt_tokens"]
    completion_tokens = reference["usage"]["completion_tokens"]
    got = completion.usage
    assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == \
        (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
    # a list holding one prompt is the same request
    again = client.completions.create(model=TASK, prompt=[PROMPT], max_tokens=12, temperature=0)
    assert again.choices[0].text == choice.text


@slow
def test_chat_with_the_base_model_knows_the_capital_of_france(client, base_id):
    chat = client.chat.completions.create(
        model=base_id, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30, temperature=0)
    [choice] = chat.choices
    assert "Paris" in choice.message.content
    assert (choice.message.role, choice.finish_reason) == ("assistant", "stop")
    assert chat.object == "chat.completion"
    assert chat.usage.prompt_tokens > 10 and chat.usage.completion_tokens > 0


# ---------------------------------------------------------------------------------------------------------
# Streaming


@slow
@pytest.mark.parametrize("model, prompt", [(TASK, PROMPT), (None, MULTIBYTE_PROMPT)])
def test_streamed_completion_equals_whole(client, base_id, model, prompt):
    model = model or base_id
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert "".join(d.text for d in deltas) == whole.choices[0].text
    assert not any(REPLACEMENT_CHAR in d.text for d in deltas)
    assert [d.finish_reason for d in deltas][-1] == whole.choices[0].finish_reason
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@slow
def test_streamed_chat_equals_whole(client, base_id):
    request = {"model": base_id, "messages": [{"role": "user", "content": "What is the capital of France?"}],
               "max_tokens": 30, "temperature": 0}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content or "" for d in deltas) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks]
    assert finishes[-1] == "stop" and not any(finishes[:-1])


@slow
def test_generate_stream_equals_whole(server):
    for prompt in (PROMPT, MULTIBYTE_PROMPT):
        whole = _generate(server, TASK, prompt, max_new_tokens=16)
        with httpx.stream("POST", server.url + "/generate", params={"task": TASK}, headers=_auth("acme"),
                          json={"prompt": prompt, "max_new_tokens": 16, "stream": True}, timeout=120) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert "".join(c["text"] for c in chunks) == whole["text"]
        assert [t for c in chunks for t in c["token_ids"]] == whole["token_ids"]
        assert not any(REPLACEMENT_CHAR in c["text"] for c in chunks)
        final = chunks[-1]
        assert (final["finish_reason"], final["usage"]) == (whole["finish_reason"], whole["usage"])
        assert all("finish_reason" not in c for c in chunks[:-1])


# ---------------------------------------------------------------------------------------------------------
# Sampling parameters


@slow
def test_n_choices_are_seeded_seed_plus_i(client, base_id):
    greedy = client.completions.create(model=base_id, prompt=PROMPT, max_tokens=8, temperature=0, n=2, seed=3)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].text == greedy.choices[1].text
    assert greedy.usage.completion_tokens == 2 * 8

    sampling = {"model": base_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0}
    sampled = client.completions.create(**sampling, n=2, seed=7)
    assert [c.index for c in sampled.choices] == [0, 1]
    for i, choice in enumerate(sampled.choices):  # choice i is exactly the n=1 request seeded seed + i
        assert choice.text == client.completions.create(**sampling, seed=7 + i).choices[0].text
    streamed = client.completions.create(**sampling, n=2, seed=7, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in sampled.choices]


@slow
@pytest.mark.parametrize("stop", ["\n", [".", "answer"], "Paris"])
def test_stop_strings_whole_and_streamed(client, base_id, stop):
    greedy = {"model": base_id, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    plain = client.completions.create(**greedy).choices[0].text
    assert "Paris." in plain and "\n" in plain  # else this test tests nothing
    stops = [stop] if isinstance(stop, str) else stop
    expected = plain[:min(plain.find(s) for s in stops if s in plain)]
    whole = client.completions.create(**greedy, stop=stop)
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(**greedy, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


@slow
def test_stop_string_in_chat(client, base_id):
    chat = {"model": base_id, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 30, "temperature": 0}
    answer = client.chat.completions.create(**chat).choices[0].message.content
    assert " is" in answer, answer
    cut = answer[:answer.find(" is")]
    assert client.chat.completions.create(**chat, stop=" is").choices[0].message.content == cut
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **chat, stop=" is", stream=True)) == cut


# ---------------------------------------------------------------------------------------------------------
# Errors


@slow
def test_unknown_model_is_model_not_found(client, server):
    for name in ("no-such-task", "org/some-model"):
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model=name, prompt=PROMPT)
        assert err.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    # another tenant's task is unknown to the caller
    solo = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["solo"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        solo.completions.create(model=TASK, prompt=PROMPT)


@slow
@pytest.mark.parametrize("body, status, param", [
    ({"prompt": PROMPT, "temperature": 5}, 400, "temperature"),
    ({"prompt": PROMPT, "n": 0}, 400, "n"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"prompt": PROMPT, "logprobs": 21}, 400, "logprobs"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),  # only with echo
    ({"prompt": PROMPT, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"5": 101}}, 400, "logit_bias.5"),
    ({"prompt": PROMPT, "stop_token_ids": [-1]}, 400, "stop_token_ids.0"),
    ({"prompt": PROMPT, "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": PROMPT, "min_tokens": 20, "max_tokens": 4}, 400, None),
    ({"prompt": PROMPT, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
     400, None),
    ({"prompt": PROMPT, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"prompt": PROMPT, "guided_regex": "a+", "guided_choice": ["a"]}, 400, "guided_choice"),
    ({"prompt": PROMPT, "best_of": 3}, 400, "best_of"),
    ({"prompt": PROMPT, "suffix": "x"}, 400, "suffix"),
    ({"prompt": PROMPT, "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 9000}, 400, None),  # beyond the model's context
    ({}, 400, "prompt"),
    ({"prompt": PROMPT, "model": "nope"}, 404, "model"),
])
def test_errors_have_openai_shape(server, base_id, body, status, param):
    r = httpx.post(server.url + "/v1/completions", headers=_auth("acme"), json={"model": base_id, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@slow
def test_error_shapes_of_auth_and_other_routes(server, base_id):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": base_id, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(server.url + "/v1/chat/completions", headers=_auth("acme"),
                   json={"model": base_id, "messages": [{"role": "user", "content": "hi"}], "tools": [{}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.0.function"
    # extra fields clients send are ignored on /v1 ...
    r = httpx.post(server.url + "/v1/completions", headers=_auth("acme"),
                   json={"model": base_id, "prompt": PROMPT, "max_tokens": 2, "user": "x",
                         "presence_penalty": 0})
    assert r.status_code == 200, r.text
    # ... while the other routes keep FastAPI's shape
    r = httpx.post(server.url + "/generate", headers=_auth("acme"), json={"prompt": PROMPT, "bogus": 1})
    assert r.status_code == 422 and "detail" in r.json()
    assert httpx.get(server.url + "/prefixes/nope", headers=_auth("acme")).json().keys() == {"detail"}
    assert httpx.get(server.url + "/prefixes").json().keys() == {"detail"}


# ---------------------------------------------------------------------------------------------------------
# A stream holds its slot while it lasts, and gives it back when the client goes away


def _wait_idle(server) -> int:
    running = None
    for _ in range(40):
        running = httpx.get(server.url + "/healthz").json()["running"]
        if running == 0:
            break
        time.sleep(0.25)
    return running


@slow
@pytest.mark.parametrize("path, body", [
    ("/generate", {"prompt": PROMPT, "max_new_tokens": 4000, "ignore_eos": True, "stream": True}),
    ("/v1/completions", {"model": TASK, "prompt": PROMPT, "max_tokens": 4000, "ignore_eos": True,
                         "stream": True, "n": 2}),
])
def test_disconnect_frees_the_slot(server, prefix_adapter, path, body):
    # solo (one request at a time) needs the task too
    r = httpx.post(f"{server.url}/prefixes/{TASK}", headers=_auth("solo"),
                   files=[("files", (n, b)) for n, b in prefix_adapter.items()])
    assert r.status_code == 201, r.text
    solo = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["solo"], max_retries=0)
    cancelled = _metric(server, "cancelled", "solo")
    with (httpx.Client(timeout=60) as http,
          http.stream("POST", server.url + path, params={"task": TASK}, headers=_auth("solo"),
                      json=body) as r):
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert httpx.get(server.url + "/healthz").json()["running"] == body.get("n", 1)
        with pytest.raises(openai.RateLimitError) as err:  # the stream holds solo's only slot
            solo.completions.create(model=TASK, prompt=PROMPT, max_tokens=1)
        assert err.value.code == "rate_limit_exceeded"
    assert _wait_idle(server) == 0, "the abandoned stream is still generating"
    assert _metric(server, "cancelled", "solo") == cancelled + body.get("n", 1)
    assert solo.completions.create(model=TASK, prompt=PROMPT, max_tokens=1).choices  # the slot is back




# ---------------------------------------------------------------------------------------------------------
# Logprobs, echo, token prompts, prompt scoring


@slow
def test_echo_and_logprobs_with_text_and_token_prompts(client, server):
    whole = client.completions.create(model=TASK, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                      logprobs=3)
    [choice] = whole.choices
    lp = choice.logprobs
    prompt_ids = httpx.post(server.url + "/tokenize", headers=_auth("acme"),
                            json={"prompt": PROMPT}).json()["tokens"]
    n = len(prompt_ids)
    assert choice.text.startswith(PROMPT) and "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == n + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert logprob <= 0 and top[token] == logprob and 3 <= len(top) <= 4  # the chosen one is always in
        assert max(top.values()) >= logprob
    # greedy: every generated token is the best of its top_logprobs
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values()) for i in range(n, n + 4))
    # the same prompt as token ids, twice in one request, scored only (max_tokens 0)
    scored = client.completions.create(model=TASK, prompt=[prompt_ids, prompt_ids[:3]], max_tokens=0,
                                       echo=True, logprobs=3, temperature=0)
    assert [c.index for c in scored.choices] == [0, 1]
    first, second = scored.choices
    assert (first.text, first.finish_reason) == (PROMPT, "length")
    assert first.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n], abs=1e-4)
    assert second.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:3], abs=1e-4)
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == n + 3
    # without echo, logprobs cover the generated tokens only, offsets continue after the prompt
    plain = client.completions.create(model=TASK, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    assert plain.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[n:], abs=1e-4)
    # offsets index the choice's text (vLLM's convention)
    assert plain.choices[0].logprobs.text_offset[0] == 0


@slow
def test_several_prompts_and_n_follow_openai_indexing(client, base_id):
    prompts = [PROMPT, "One, two, three,"]
    out = client.completions.create(model=base_id, prompt=prompts, max_tokens=3, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(model=base_id, prompt=prompt, max_tokens=3,
                                          temperature=0).choices[0]
        assert out.choices[2 * p].text == out.choices[2 * p + 1].text == alone.text


@slow
def test_streamed_logprobs_equal_whole(client):
    request = {"model": TASK, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**request).choices[0].logprobs
    tokens, logprobs, offsets = [], [], []
    for chunk in client.completions.create(**request, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            logprobs += chunk.choices[0].logprobs.token_logprobs
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset
    assert logprobs == pytest.approx(whole.token_logprobs, abs=1e-5)


@slow
def test_chat_logprobs_have_openai_shape(client, base_id):
    chat = client.chat.completions.create(
        model=base_id, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
        temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(c.token for c in content).startswith(chat.choices[0].message.content)
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob  # greedy
        assert bytes(c.bytes).decode() == c.token


# ---------------------------------------------------------------------------------------------------------
# Sampling controls and structured outputs


@slow
def test_logit_bias_penalties_min_tokens_and_stop_token_ids(client, base_id, server):
    paris = httpx.post(server.url + "/tokenize", headers=_auth("acme"),
                       json={"prompt": " Paris", "add_special_tokens": False}).json()["tokens"]
    assert len(paris) == 1
    greedy = {"model": base_id, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    forced = client.completions.create(**greedy, logit_bias={str(paris[0]): 100})
    assert forced.choices[0].text == " Paris" * 8
    biased = client.completions.create(**greedy, logit_bias={str(paris[0]): 9}).choices[0].text
    penalised = client.completions.create(**greedy, logit_bias={str(paris[0]): 9}, frequency_penalty=2.0,
                                          presence_penalty=2.0).choices[0].text
    repeated = client.completions.create(**greedy, logit_bias={str(paris[0]): 9},
                                         extra_body={"repetition_penalty": 3.0}).choices[0].text
    assert biased.count("Paris") > penalised.count("Paris")
    assert biased.count("Paris") > repeated.count("Paris")
    # a stop id ends the request like EOS (not in the text); min_tokens holds it back
    stopped = client.completions.create(**greedy, extra_body={"stop_token_ids": paris})
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("", "stop")
    held = client.completions.create(**greedy, logit_bias={str(paris[0]): 100},
                                     extra_body={"stop_token_ids": paris, "min_tokens": 3})
    # (min_tokens masks the stop id itself for 3 tokens, as vLLM does; the 4th, forced, stops)
    assert "Paris" not in held.choices[0].text and held.choices[0].finish_reason == "stop"
    assert held.usage.completion_tokens == 4
    # -1 is "unseeded"; tiny temperatures are greedy
    assert client.completions.create(**{**greedy, "temperature": 1.0, "max_tokens": 2},
                                     seed=-1).choices[0].text
    reference = client.completions.create(**{**greedy, "max_tokens": 4}).choices[0].text
    for tiny in (1e-38, 1e-40, 7e-188):
        assert client.completions.create(**{**greedy, "max_tokens": 4,
                                            "temperature": tiny}).choices[0].text == \
            reference


@slow
def test_structured_outputs_parse_and_validate(client, base_id):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "population", "capital"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    for model in (base_id, TASK):
        chat = client.chat.completions.create(
            model=model, messages=messages, max_tokens=60, temperature=0.8, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    anything = client.chat.completions.create(model=base_id, messages=messages, max_tokens=80, temperature=0,
                                              response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    choice = client.completions.create(model=base_id, prompt="Is Paris in France? Answer:", max_tokens=5,
                                       temperature=1.0, seed=3, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")
    regex = client.completions.create(model=base_id, prompt="A year:", max_tokens=8, temperature=0,
                                      extra_body={"guided_regex": "[12][0-9]{3}"})
    assert len(regex.choices[0].text) == 4 and regex.choices[0].text.isdigit()


# ---------------------------------------------------------------------------------------------------------
# Non-finite inputs, usage details, tokenizer routes


@slow
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_temperature_is_a_clear_client_error(server, base_id, value):
    body = f'{{"model": "{base_id}", "prompt": "hi", "temperature": {value}}}'.encode()
    headers = {**_auth("acme"), "content-type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
    r = httpx.post(server.url + "/generate", content=b'{"prompt": "hi", "temperature": %s}' % value.encode(),
                   headers=headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "temperature"], r.text


@slow
def test_usage_counts_the_prefix_as_cached_tokens(client, base_id):
    for model, cached in ((TASK, 8), (base_id, 0)):
        out = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0)
        assert out.usage.prompt_tokens_details.cached_tokens == cached
        chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


@slow
def test_tokenizer_routes_have_vllm_shapes(server, base_id):
    r = httpx.post(server.url + "/tokenize", headers=_auth("acme"), json={"model": base_id, "prompt": PROMPT,
                                                                           "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert body["max_model_len"] > 1000
    back = httpx.post(server.url + "/detokenize", headers=_auth("acme"), json={"tokens": body["tokens"]})
    assert back.json() == {"prompt": PROMPT}
    chat = httpx.post(server.url + "/tokenize", headers=_auth("acme"),
                      json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3
    info = httpx.get(server.url + "/tokenizer_info", headers=_auth("acme")).json()
    assert info["eos_token"] and "chat_template" in info and info["tokenizer_class"]
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401  # like every other route
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # the probe needs no key


# ---------------------------------------------------------------------------------------------------------
# Tool calling (server/api/tools.py): the output is forced into a valid call by the structured-output grammar

WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": False}
ADD_ARGS = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                             "b": {"type": "integer", "minimum": 0, "maximum": 999}},
            "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": WEATHER_ARGS}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": ADD_ARGS}}]
SCHEMAS = {"get_weather": WEATHER_ARGS, "add": ADD_ARGS}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(calls, names: set[str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _streamed_calls(chunks) -> tuple[list, str, list]:
    """Accumulate a stream's tool-call deltas as OpenAI clients do (by index); the finish reason; the
    chunks."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    as_objects = [openai.types.chat.ChatCompletionMessageToolCall(
        id=c["id"], type="function", function={"name": c["name"], "arguments": c["arguments"]})
        for _, c in sorted(calls.items())]
    return as_objects, finish, chunks


@slow
@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "add"}),
    ({"type": "function", "function": {"name": "add"}}, {"add"}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_parse_and_validate(client, base_id, tool_choice, names, stream):
    request = {"model": base_id, "messages": WEATHER_QUESTION, "tools": TOOLS, "tool_choice": tool_choice,
               "parallel_tool_calls": False, "max_tokens": 50, "temperature": 0.7, "seed": 5}
    if not stream:
        chat = client.chat.completions.create(**request)
        [choice] = chat.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, names)
        return
    calls, finish, chunks = _streamed_calls(list(client.chat.completions.create(
        **request, stream=True, stream_options={"include_usage": True})))
    assert finish == "tool_calls" and len(calls) == 1
    _check_calls(calls, names)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 10


@slow
def test_parallel_calls_and_none_and_auto(client, base_id):
    # parallel_tool_calls (OpenAI's default): one or more calls, each valid, streamed as whole
    request = {"model": base_id,
               "messages": [{"role": "user", "content": "What is the weather in Paris and Rome?"}],
               "tools": TOOLS, "tool_choice": "required", "max_tokens": 60, "temperature": 0}
    [choice] = client.chat.completions.create(**request).choices
    calls = choice.message.tool_calls
    _check_calls(calls, set(SCHEMAS))
    assert len({c.id for c in calls}) == len(calls)
    if choice.finish_reason == "length":  # the model went on calling (SmolLM2 does): the cut call is text
        assert choice.message.content is not None and "</tool_call>" not in choice.message.content
    else:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
    streamed, finish, _ = _streamed_calls(list(client.chat.completions.create(**request, stream=True)))
    assert finish == choice.finish_reason
    assert [c.function for c in streamed] == [c.function for c in calls]
    # none: the tools are not offered, the answer is text
    plain = client.chat.completions.create(model=base_id, messages=WEATHER_QUESTION, tools=TOOLS,
                                           tool_choice="none", max_tokens=20, temperature=0)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    assert plain.choices[0].finish_reason in ("stop", "length")
    # auto: text or a valid call, never a malformed call, over several samples (one call at most: the
    # model's repeated calls, above, would run into max_tokens)
    for seed in range(3):
        auto = client.chat.completions.create(model=base_id, messages=WEATHER_QUESTION, tools=TOOLS,
                                              parallel_tool_calls=False, max_tokens=60, temperature=1.0,
                                              seed=seed)
        message, finish = auto.choices[0].message, auto.choices[0].finish_reason
        if message.tool_calls:
            assert finish == "tool_calls" and message.content is None and len(message.tool_calls) == 1
            _check_calls(message.tool_calls, set(SCHEMAS))
        else:
            assert message.content and not message.content.startswith("<"), message.content


@slow
def test_a_second_turn_with_the_tool_result(client, base_id):
    first = client.chat.completions.create(model=base_id, messages=WEATHER_QUESTION, tools=TOOLS,
                                           tool_choice={"type": "function",
                                                        "function": {"name": "get_weather"}},
                                           max_tokens=50, temperature=0)
    [call] = first.choices[0].message.tool_calls
    result = "It is 31 degrees and sunny in Paris, with a light wind from the south."
    conversation = WEATHER_QUESTION + [first.choices[0].message.model_dump(exclude_none=True),
                                       {"role": "tool", "tool_call_id": call.id, "content": result}]
    second = client.chat.completions.create(model=base_id, messages=conversation, tools=TOOLS,
                                            tool_choice="none", max_tokens=20, temperature=0)
    assert second.choices[0].message.content and second.choices[0].finish_reason in ("stop", "length")
    # the call and its result are in the prompt: it grew by at least their text's tokens
    reference = client.chat.completions.create(model=base_id, messages=WEATHER_QUESTION, tools=TOOLS,
                                               tool_choice="none", max_tokens=1)
    assert second.usage.prompt_tokens >= reference.usage.prompt_tokens + len(result.split()) + 10
    streamed = list(client.chat.completions.create(model=base_id, messages=conversation, tools=TOOLS,
                                                   tool_choice="none", max_tokens=20, temperature=0,
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == second.choices[0].message.content


@slow
@pytest.mark.parametrize("change, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!", "parameters": WEATHER_ARGS}}]},
     "tools.0.function.name"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "x", "parameters": "object"}}]},
     "tools.1.function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "add", "arguments": "{1"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
])
def test_bad_tool_requests_are_400_naming_the_param(server, base_id, change, param):
    body = {"model": base_id, "messages": WEATHER_QUESTION, "max_tokens": 5, **change}
    r = httpx.post(server.url + "/v1/chat/completions", headers=_auth("acme"), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


@slow
def test_langchain_binds_tools(server, base_id):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """The current weather in a city."""

        city: str = Field(max_length=20, description="the city")
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    llm = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key=KEYS["acme"], model=base_id,
                                      max_tokens=50, temperature=0, max_retries=0, timeout=120)
    message = llm.bind_tools([GetWeather, add],
                             tool_choice="GetWeather").invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1, message
    [call] = message.tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    GetWeather(**call["args"])  # validates
    message = llm.bind_tools([GetWeather, add], tool_choice="any", parallel_tool_calls=False).invoke(
        "What is 2 plus 3?")
    assert len(message.tool_calls) == 1 and all(c["name"] in ("GetWeather",
                                                              "add") for c in message.tool_calls)
    for c in message.tool_calls:
        if c["name"] == "add":
            assert set(c["args"]) == {"a", "b"} and all(type(v) is int for v in c["args"].values())
        else:
            GetWeather(**c["args"])


@slow
def test_server_log_has_no_tracebacks(server):
    assert "Traceback" not in server.log_text(), server.log_tail()
