"""The server under overload and at its end, as a real process over HTTP: the engine in its own process,
a bounded waiting queue (503 + Retry-After), per-request deadlines, a graceful drain on SIGTERM, and prompts
refused by size before they are tokenized. A dead or stuck engine process: tests/engine/test_liveness.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest

from server.engine.model import default_model_dir
from tests.helpers.server_process import ServerProcess

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

PROMPT = "Write a long story about a lighthouse keeper."


@pytest.fixture(scope="module", autouse=True)
def converted_model():
    default_model_dir()  # convert the embedded model once, before any server starts


def _start(tmp_path, *args: str) -> ServerProcess:
    return ServerProcess(
        tmp_path / "store", tmp_path / "server.log", extra_args=args, startup_timeout=300
    ).start()


def _engine_pid(server: ServerProcess) -> int:
    """The engine process: the server's only child running server.engine.core."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if ppid == server.proc.pid and b"server.engine.core" in cmdline:
            return int(pid)
    raise AssertionError("no engine process under the server")


def _outcomes(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("prefix_serve_requests_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            counts[outcome] = counts.get(outcome, 0) + float(line.rsplit(" ", 1)[1])
    return counts


async def _burst(url: str, count: int, body: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=count + 4)) as client:
        return await asyncio.gather(*(client.post(f"{url}/generate", json=body) for _ in range(count)))


def _long_request(client: httpx.AsyncClient, server: ServerProcess, new_tokens: int) -> asyncio.Task:
    """A plain /generate request that keeps a batch row busy for ``new_tokens`` tokens."""
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "ignore_eos": True}
    return asyncio.create_task(client.post(f"{server.url}/generate", json=body))


async def _until_running(client: httpx.AsyncClient, server: ServerProcess, count: int) -> None:
    while (await client.get(f"{server.url}/healthz")).json()["running"] < count:
        await asyncio.sleep(0.05)


def test_engine_runs_in_its_own_process(tmp_path):
    server = _start(tmp_path)
    try:
        engine = _engine_pid(server)
        assert engine != server.proc.pid
        r = httpx.post(
            f"{server.url}/generate",
            json={"prompt": "The capital of France is", "max_new_tokens": 8},
            timeout=120,
        )
        assert r.status_code == 200 and "Paris" in r.json()["text"], r.text
    finally:
        assert server.stop() == 0
    assert not os.path.exists(f"/proc/{engine}"), "the engine process outlived the server"


def test_queue_limit_answers_503_and_every_accepted_request_completes(tmp_path):
    server = _start(tmp_path, "--max-batch-size", "2", "--max-waiting-requests", "3")
    try:
        body = {"prompt": PROMPT, "max_new_tokens": 24, "ignore_eos": True}
        responses = asyncio.run(_burst(server.url, 16, body))
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 503]
        assert len(ok) + len(refused) == 16, [r.status_code for r in responses]
        # at most 2 running + 3 waiting at any time; a burst of 16 arriving together must see refusals
        assert refused and len(ok) >= 5
        for r in ok:  # every accepted request ran to its end
            assert len(r.json()["token_ids"]) == 24 and r.json()["finish_reason"] == "length"
        for r in refused:
            assert r.headers["retry-after"] == "1"
            assert "--max-waiting-requests" in r.json()["detail"]
        assert _outcomes(server.url).get("overloaded") == len(refused)
        assert httpx.get(f"{server.url}/healthz").json()["waiting"] == 0
    finally:
        server.stop()


def test_a_request_past_its_deadline_leaves_the_queue_unserved(tmp_path):
    server = _start(tmp_path, "--max-batch-size", "1")
    try:

        async def scenario():
            async with httpx.AsyncClient(timeout=300) as client:
                long = _long_request(client, server, 300)
                await _until_running(client, server, 1)
                late = await client.post(
                    f"{server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 4, "timeout": 0.3}
                )
                late_v1 = await client.post(
                    f"{server.url}/v1/completions",
                    json={"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 4, "timeout": 0.3},
                )
                return await long, late, late_v1

        long, late, late_v1 = asyncio.run(scenario())
        assert late.status_code == 503 and late.headers["retry-after"] == "1", late.text
        assert "deadline" in late.json()["detail"]
        assert late_v1.status_code == 503 and "deadline" in late_v1.json()["error"]["message"], late_v1.text
        assert long.status_code == 200 and len(long.json()["token_ids"]) == 300
        assert _outcomes(server.url).get("timeout") == 2
    finally:
        server.stop()


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path):
    server = _start(tmp_path, "--shutdown-timeout", "120")
    try:

        async def scenario():
            async with httpx.AsyncClient(timeout=300) as client:
                running = [_long_request(client, server, 150) for _ in range(2)]
                await _until_running(client, server, 2)
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                health = await client.get(f"{server.url}/healthz")
                refused = await client.post(
                    f"{server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 2}
                )
                return await asyncio.gather(*running), health, refused

        done, health, refused = asyncio.run(scenario())
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
        for r in done:  # in flight when SIGTERM came: finished, not cut
            assert r.status_code == 200 and len(r.json()["token_ids"]) == 150, r.text
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_sigterm_cancels_what_outlasts_the_shutdown_timeout_with_a_clear_error(tmp_path):
    server = _start(tmp_path, "--shutdown-timeout", "1")
    try:

        async def scenario():
            async with httpx.AsyncClient(timeout=300) as client:
                body = {"prompt": PROMPT, "max_new_tokens": 2000, "ignore_eos": True}
                plain = asyncio.create_task(client.post(f"{server.url}/generate", json=body))

                async def stream():
                    async with client.stream(
                        "POST", f"{server.url}/generate", json={**body, "stream": True}
                    ) as r:
                        return r.status_code, [
                            line async for line in r.aiter_lines() if line.startswith("data:")
                        ]

                streamed = asyncio.create_task(stream())
                await _until_running(client, server, 2)
                server.proc.send_signal(signal.SIGTERM)
                return await plain, await streamed

        plain, (status, events) = asyncio.run(scenario())
        assert plain.status_code == 503 and "shutting down" in plain.json()["detail"], plain.text
        assert status == 200 and events[-1] == "data: [DONE]"
        error = json.loads(events[-2][len("data:") :])
        assert "shutting down" in error["error"]["message"]
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_prompts_are_refused_by_size_before_tokenizing_and_healthz_stays_responsive(tmp_path):
    server = _start(tmp_path)
    try:

        async def scenario():
            async with httpx.AsyncClient(timeout=120) as client:
                huge = asyncio.create_task(
                    client.post(
                        # 1 MB: under the 4 MiB body cap, over what the 8,192-position context could hold
                        f"{server.url}/generate", json={"prompt": "word " * 200_000, "max_new_tokens": 2}
                    )
                )
                health = await client.get(f"{server.url}/healthz")
                return await huge, health

        huge, health = asyncio.run(scenario())
        assert huge.status_code == 400 and "shorten it" in huge.json()["detail"], huge.text[:300]
        assert health.status_code == 200
        surrogate = httpx.post(
            f"{server.url}/generate",
            content=b'{"prompt": "a \\ud800 b", "max_new_tokens": 2}',
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert surrogate.status_code == 400 and "surrogate" in surrogate.json()["detail"], surrogate.text
        chat = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "x" * 3_000_000}],
            },
            timeout=30,
        )
        assert chat.status_code == 400 and "shorten it" in chat.json()["error"]["message"], chat.text[:300]
        ok = httpx.post(
            f"{server.url}/generate",
            json={"prompt": "The capital of France is", "max_new_tokens": 4},
            timeout=60,
        )
        assert ok.status_code == 200
    finally:
        server.stop()


def test_an_unsupported_model_is_refused_at_start_with_the_reason(tmp_path):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    server = ServerProcess(tmp_path / "store", tmp_path / "server.log", model=str(bad), startup_timeout=120)
    with pytest.raises(Exception, match="exited with code"):
        server.start()
    assert "'mamba' is not supported" in server.log_text()


# ---------------------------------------------------------------------------------------------------------
# The pure pieces: the wire format and the admission rule


def test_sampling_params_cross_the_wire_unchanged_but_for_stop_strings():
    import dataclasses

    import msgspec

    from server.engine import protocol
    from server.engine.sequence import SamplingParams

    params = SamplingParams(
        max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, stop=("\n",), ignore_eos=True,
        stop_token_ids=(4, 5), logit_bias=((3, -2.5),), structured=("regex", "a+"),
    )
    frame = protocol.encode(protocol.AddRequest(5, [1, 2, 3], params.for_engine(), "t@1#ab", "acme"))
    request = protocol.decode_to_engine(frame)
    assert isinstance(request, protocol.AddRequest)
    assert request.prompt_ids == [1, 2, 3] and request.prefix_ref == "t@1#ab" and request.tenant == "acme"
    # the HTTP process looks for stop strings (it detokenizes); the engine never sees them; tuples stay
    # tuples
    assert request.params == protocol.EngineParams(
        max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, ignore_eos=True,
        stop_token_ids=(4, 5), logit_bias=((3, -2.5),), structured=("regex", "a+"),
    )
    # the engine's fields are SamplingParams' own, less the stop strings (one list, checked once, here)
    assert set(protocol.EngineParams.__struct_fields__) == {
        f.name for f in dataclasses.fields(SamplingParams)} - {"stop"}
    # a frame that does not match the schema is refused when decoded, not deep in the engine
    bad = msgspec.msgpack.encode({"type": "AddRequest", "id": "five", "prompt_ids": [1]})
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_to_engine(bad)


def _client(max_batch_size: int, max_waiting: int):
    from server.engine.core import EngineCoreSpec
    from server.frontend.client import EngineClient, EngineLimits

    spec = EngineCoreSpec(
        model="default",
        dtype="float32",
        device="cpu",
        threads=1,
        max_batch_size=max_batch_size,
        kv_cache_bytes=1 << 20,
        max_step_tokens=64,
        input_address="ipc://unused",
        output_address="ipc://unused",
        parent_pid=0,
    )
    return EngineClient(
        spec, EngineLimits(max_waiting=max_waiting, request_timeout=None, prefix_cache_bytes=1)
    )


@pytest.mark.parametrize(
    "running, waiting, tenant, count, admitted",
    [
        (0, {}, "a", 1, True),  # nothing waits: always
        (
            0,
            {},
            "a",
            50,
            True,
        ),  # larger than the whole limit, but nothing waits: it could never run otherwise
        (0, {"a": 2}, "a", 2, True),  # 4 not yet in the batch, 2 of them join at the next step: 2 queued <= 2
        (0, {"a": 2}, "a", 3, False),  # 3 queued > 2, and "a" holds the whole queue
        (2, {"a": 2}, "a", 1, False),  # the batch is full: 3 queued > 2
        (2, {"a": 2}, "b", 1, True),  # past the limit, but "b" holds less than its share (2 tenants: 1 each)
        (2, {"a": 2, "b": 1}, "b", 1, False),  # "b" already holds its share
        (2, {"a": 1, "b": 1}, "c", 1, False),  # 3 tenants: a share of 0 (2 // 3)
    ],
)
def test_admission_bounds_the_queue_and_keeps_a_share_for_each_tenant(
    running, waiting, tenant, count, admitted
):
    from server.engine.sequence import SamplingParams, Sequence
    from server.frontend.client import EngineOverloaded

    client = _client(max_batch_size=2, max_waiting=2)
    client.num_running = running
    for name, n in waiting.items():
        for _ in range(n):
            client._count_waiting(Sequence([1], SamplingParams(), tenant=name), +1)
    if admitted:
        client.check_admission(count, tenant)
    else:
        with pytest.raises(EngineOverloaded, match="--max-waiting-requests"):
            client.check_admission(count, tenant)


def test_a_draining_or_dead_engine_refuses_with_a_reason():
    from server.frontend.client import EngineUnavailable

    client = _client(max_batch_size=2, max_waiting=2)
    client.draining = True
    with pytest.raises(EngineUnavailable, match="shutting down"):
        client.check_admission(1, "a")
    client.draining = False
    client.supervisor.unavailable = "the engine process exited unexpectedly (code -9)"
    with pytest.raises(EngineUnavailable, match="code -9"):
        client.check_admission(1, "a")
