"""A stuck or dead engine process is noticed and replaced, and shutdown is fast, against the real server
process over HTTP (the default model): SIGSTOP of the engine under load, kill -9 of it (then the same task
gives the same greedy output), more kills than --engine-max-restarts allows (the server exits 1), and the
time from SIGTERM to exit of an idle server; and the engine process alone: a heartbeat when idle and after
every step (prefill chunks too), and its exit within 1 s of SHUTDOWN."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import re
import signal
import time

import httpx
import pytest
import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from server.engine.model import default_model_dir
from tests.engine.test_overload import PROMPT, _client, _engine_pid, _start, _until_running

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long


@pytest.fixture(scope="module", autouse=True)
def converted_model():
    default_model_dir()  # convert the embedded model once, before any server starts


def _restarts(url: str) -> dict[str, float]:
    counts = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("prefix_serve_engine_restarts_total{"):
            counts[line.split('cause="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return counts


async def _until_healthy(client: httpx.AsyncClient, url: str, within: float) -> httpx.Response:
    deadline = time.monotonic() + within
    while (health := await client.get(f"{url}/healthz")).status_code != 200:
        assert time.monotonic() < deadline, f"not healthy again within {within:.0f}s: {health.text}"
        await asyncio.sleep(0.1)
    return health


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.slow
def test_a_stopped_engine_is_reported_its_requests_fail_retryably_and_it_is_replaced(tmp_path):
    server = _start(tmp_path, "--engine-stall-timeout", "3")
    stopped = None
    try:

        async def scenario():
            nonlocal stopped
            async with httpx.AsyncClient(timeout=120) as client:
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
                stopped = _engine_pid(server)
                os.kill(stopped, signal.SIGSTOP)
                # accepted while the engine is stuck but not yet noticed: it must not hang either
                late = asyncio.create_task(
                    client.post(f"{server.url}/generate", json={"prompt": "Hi", "max_new_tokens": 4})
                )
                cut, (status, events), late = await plain, await streamed, await late
                health = await client.get(f"{server.url}/health")
                healthy = await _until_healthy(client, server.url, 120)
                after = await client.post(
                    f"{server.url}/generate",
                    json={"prompt": "The capital of France is", "max_new_tokens": 8},
                )
                return cut, status, events, late, health, healthy, after

        cut, status, events, late, health, healthy, after = asyncio.run(scenario())
        for r in (cut, late):  # in flight when the engine stopped: a clear, retryable error, not a hang
            assert r.status_code == 503 and "made no progress" in r.json()["detail"], r.text
            assert int(r.headers["retry-after"]) >= 1
        assert status == 200 and events[-1] == "data: [DONE]"
        assert "made no progress" in json.loads(events[-2][len("data:") :])["error"]["message"]
        assert health.status_code == 503 and health.json()["status"] == "engine_stalled", health.text
        assert int(health.headers["retry-after"]) >= 1
        assert healthy.json()["engine_restarts"] == 1
        assert after.status_code == 200 and "Paris" in after.json()["text"], after.text
        assert _engine_pid(server) != stopped and _gone(stopped), "the stuck engine was not replaced"
        assert _restarts(server.url) == {"stalled": 1}
    finally:
        if stopped is not None and not _gone(stopped):
            os.kill(stopped, signal.SIGKILL)
        server.stop()


@pytest.mark.slow
def test_a_killed_engine_is_restarted_and_serves_the_same_task_alike_then_sigterm_is_fast(tmp_path):
    server = _start(tmp_path)
    try:
        kv = torch.randn(30, 2, 3, 4, 64, generator=torch.Generator().manual_seed(0))
        data = to_own_format(PrefixArtifact(PrefixKind.PREFIX_TUNING, kv, "prefix-serve"))
        up = httpx.post(f"{server.url}/prefixes/t", files=[("files", ("t.safetensors", data))], timeout=60)
        assert up.status_code == 201, up.text
        greedy = {"prompt": "Count to ten:", "max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
        before = httpx.post(f"{server.url}/generate", params={"task": "t"}, json=greedy, timeout=120)
        assert before.status_code == 200, before.text
        version = httpx.get(f"{server.url}/prefixes/t").json()["version"]
        # what the server measured for its engine's start-up: the Retry-After while it restarts
        start_s = float(re.findall(r"engine process \d+ ready in ([\d.]+)s", server.log_text())[-1])

        async def scenario():
            async with httpx.AsyncClient(timeout=120) as client:
                running = asyncio.create_task(
                    client.post(
                        f"{server.url}/generate",
                        json={"prompt": PROMPT, "max_new_tokens": 2000, "ignore_eos": True},
                    )
                )
                await _until_running(client, server, 1)
                os.kill(_engine_pid(server), signal.SIGKILL)
                cut = await running
                refused = await client.post(f"{server.url}/generate", params={"task": "t"}, json=greedy)
                health = await client.get(f"{server.url}/healthz")
                await _until_healthy(client, server.url, 120)
                again = await client.post(f"{server.url}/generate", params={"task": "t"}, json=greedy)
                return cut, refused, health, again

        cut, refused, health, again = asyncio.run(scenario())
        assert cut.status_code == 503 and "engine process exited" in cut.json()["detail"], cut.text
        # the lost request too is told when to come back: no later than the replacement should serve
        assert 1 <= int(cut.headers["retry-after"]) <= math.ceil(start_s), cut.headers
        assert refused.status_code == 503 and "is starting" in refused.json()["detail"], refused.text
        # the expected restart time, counted down since the engine was found dead (not a blanket 1 s)
        assert max(1, math.ceil(start_s) - 2) <= int(refused.headers["retry-after"]) <= math.ceil(start_s)
        assert health.status_code == 503 and health.json()["status"] == "engine_restarting", health.text
        # the task survived with its version, and the new engine (sent its tensor again) gives the same ids
        assert again.status_code == 200 and again.json()["token_ids"] == before.json()["token_ids"]
        assert httpx.get(f"{server.url}/prefixes/t").json()["version"] == version
        assert _restarts(server.url) == {"exited": 1}

        engine = _engine_pid(server)
        began = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        # an idle server (and its engine) ends within 2 s of SIGTERM (0.25 s measured on 2 cores)
        assert time.monotonic() - began < 2.0
        assert _gone(engine), "the engine process outlived the server"
    finally:
        server.stop()


@pytest.mark.slow
def test_an_engine_killed_more_often_than_allowed_makes_the_server_exit_non_zero(tmp_path):
    """Past --engine-max-restarts the server exits 1, and what it was serving then gets a 503 without
    Retry-After: no engine comes back to retry on (while one restarts, Retry-After is its expected start-up:
    the test above)."""
    server = _start(tmp_path, "--engine-max-restarts", "1")
    try:

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                os.kill(_engine_pid(server), signal.SIGKILL)
                while (await client.get(f"{server.url}/healthz")).status_code == 200:
                    await asyncio.sleep(0.05)  # until the death is noticed
                await _until_healthy(client, server.url, 120)  # the first replacement is allowed
                long = {"prompt": PROMPT, "max_new_tokens": 2000, "ignore_eos": True}
                running = asyncio.create_task(client.post(f"{server.url}/generate", json=long))
                await _until_running(client, server, 1)
                os.kill(_engine_pid(server), signal.SIGKILL)  # the second, within a minute, is not
                return await running

        lost = asyncio.run(scenario())
        assert lost.status_code == 503 and "the server gives up" in lost.json()["detail"], lost.text
        assert "retry-after" not in lost.headers, lost.headers  # retrying here soon cannot succeed
        assert server.proc.wait(60) == 1
        assert "the server gives up" in server.log_text()
    finally:
        server.stop()


@pytest.mark.slow
def test_the_engine_process_heartbeats_every_step_and_idle_and_exits_within_1s_of_shutdown(tmp_path):
    from server.engine import protocol
    from server.engine.sequence import SamplingParams
    from server.frontend.supervisor import EngineProcess

    spec = dataclasses.replace(_client(max_batch_size=2, max_waiting=2).spec, kv_cache_bytes=64 << 20,
                               input_address=f"ipc://{tmp_path}/in", output_address=f"ipc://{tmp_path}/out",
                               parent_pid=os.getpid())
    # 200 prompt tokens in steps of at most 64 (spec.max_step_tokens): 4 prefill steps, 1 new token
    request = protocol.AddRequest(1, [100 + i for i in range(200)],
                                  SamplingParams(max_new_tokens=1).for_engine(), None, "t")

    async def scenario():
        process = EngineProcess(spec, None)
        try:
            await process.start(300)
            idle = await asyncio.wait_for(process.recv(), 2 * protocol.HEARTBEAT_INTERVAL_S + 1)
            process.send(request)
            steps = []
            while not (steps and steps[-1].finished):
                message = await asyncio.wait_for(process.recv(), 60)
                if isinstance(message, protocol.StepOutput):
                    steps.append(message)
            began = time.monotonic()
            await process.stop()
            return idle, steps, time.monotonic() - began, process.returncode
        finally:
            process.kill()
            await process.wait()
            process.close()

    idle, steps, took, code = asyncio.run(scenario())
    assert isinstance(idle, protocol.Heartbeat) and idle.running == 0
    # every prefill chunk says so, though it produced no token: a long prompt is not mistaken for a stall
    assert len(steps) == 4 and [len(s.tokens) for s in steps] == [0, 0, 0, 1], steps
    assert code == 0 and took < 1.0, f"exited with {code} after {took:.2f}s"


# ---------------------------------------------------------------------------------------------------------
# The pure pieces: the restart policy and what a 503 tells clients


def test_restarts_back_off_and_are_bounded_per_minute():
    from server.frontend.supervisor import RESTART_WINDOW_S, RestartPolicy

    policy = RestartPolicy(max_per_minute=4)
    delays = []
    for at in (0.0, 1.0, 3.0, 7.0):
        delays.append(policy.delay(at))
        policy.started(at)
    assert delays == [0.0, 1.0, 2.0, 4.0]  # at once, then a doubling backoff
    assert policy.delay(8.0) is None  # a fifth within the minute: give up
    assert policy.delay(RESTART_WINDOW_S + 0.5) == 4.0  # the first has left the window: 3 recent
    assert RestartPolicy(max_per_minute=0).delay(0.0) is None


def test_retry_after_is_the_restart_countdown_and_absent_once_down_for_good():
    from server.frontend.client import EngineUnavailable

    client = _client(max_batch_size=2, max_waiting=2)
    supervisor = client.supervisor
    assert client.retry_after == 1  # serving: a full queue moves in about a second
    supervisor.status, supervisor.unavailable = "engine_restarting", "the engine process exited unexpectedly"
    supervisor._ready_expected_at = time.monotonic() + 6.2
    with pytest.raises(EngineUnavailable, match="retry in 7s") as refused:
        client.check_admission(1, "a")
    assert refused.value.retry_after == 7
    supervisor._give_up("the engine process exited unexpectedly")
    with pytest.raises(EngineUnavailable, match="gives up") as down:
        client.check_admission(1, "a")
    assert down.value.retry_after is None and supervisor.status == "engine_down"
