"""The `prefix-serve` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import uvicorn

from server.config import DTYPES, OMP_WAIT_POLICIES, Settings


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a graceful SIGTERM: stop admitting (503s, /healthz not ready), let what is in
    flight finish for up to ``shutdown_timeout`` seconds, cancel the rest with a clear error, then exit 0.

    uvicorn's own handling closes the listening socket at once (new clients get connection errors, not a
    503) and re-raises the signal after shutdown (exit status 143). A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, app_state, shutdown_timeout: float):
        super().__init__(config)
        self.app_state = app_state
        self.shutdown_timeout = shutdown_timeout
        self.draining = False
        self.engine_gave_up = False

    async def on_tick(self, counter: int) -> bool:
        """Also ends the server once its engine was replaced too often (``_serve`` then exits 1)."""
        state = getattr(self.app_state, "server", None)
        if state is not None and state.engine.supervisor.gave_up and not self.engine_gave_up:
            self.engine_gave_up = True
            await asyncio.sleep(0.2)  # let the failed requests' 503s go out
            self.should_exit = True
        return await super().on_tick(counter)

    # a signal handler: runs on the loop's thread, between callbacks
    def handle_exit(self, sig, frame) -> None:
        if self.draining or self.should_exit:
            self.force_exit = True
            return
        self.draining = True
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        state = getattr(self.app_state, "server", None)
        if state is not None:  # None: a signal during start-up, before the engine exists
            logging.getLogger(__name__).info("SIGTERM: draining for up to %.0fs", self.shutdown_timeout)
            if await state.engine.drain(self.shutdown_timeout):
                await asyncio.sleep(0.2)  # let the cancelled requests' error responses go out
        self.should_exit = True


def _serve(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.auth import AuthConfig

    try:
        settings = Settings(
            model=args.model, store_dir=args.store_dir, dtype=args.dtype, device=args.device,
            max_batch_size=args.max_batch_size, kv_cache_bytes=args.kv_cache_bytes,
            cache_bytes=args.cache_bytes, max_step_tokens=args.max_step_tokens,
            max_upload_bytes=args.max_upload_bytes, threads=args.threads,
            auth_file=Path(args.auth_file) if args.auth_file else None,
            redis_url=args.redis_url, host_cache_bytes=args.host_cache_bytes,
            redis_reconcile_interval=args.redis_reconcile_interval,
            block_size=args.block_size, prefix_caching=not args.no_prefix_caching,
            share_prefix_cache=args.share_prefix_cache, long_prefill_threshold=args.long_prefill_threshold,
            max_long_prefills=args.max_long_prefills,
            max_waiting_requests=args.max_waiting_requests, request_timeout=args.request_timeout,
            shutdown_timeout=args.shutdown_timeout, omp_wait_policy=args.omp_wait_policy,
            max_request_bytes=args.max_request_bytes, public_metrics=args.public_metrics,
            max_request_tokens=args.max_request_tokens, max_tool_prompt_tokens=args.max_tool_prompt_tokens,
            public_docs=args.public_docs,
            engine_stall_timeout=args.engine_stall_timeout, engine_max_restarts=args.engine_max_restarts,
            served_model_name=tuple(args.served_model_name or ()),
        )
        if settings.auth_file is not None:
            AuthConfig.load(settings.auth_file)  # refuse a broken auth file before loading the model
    except ValueError as exc:
        print(f"prefix-serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    # uvicorn closes idle keep-alive connections and caps connections (a 503 past the cap) but has no
    # header-read timeout: a slow client that never finishes its headers is closed by the router in front
    # (docker/nginx/nginx.conf), not here.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, timeout_keep_alive=args.timeout_keep_alive,
                            limit_concurrency=args.max_connections or None)
    server = DrainingServer(config, app.state, settings.shutdown_timeout)
    server.run()
    _exit_now(0 if server.started and not server.engine_gave_up else 1)


def _exit_now(code: int) -> NoReturn:
    """End the server process without the interpreter's teardown: once uvicorn returns, the lifespan has
    stopped the engine process and closed the store, and freeing torch and transformers module by module
    took 1.3 s on 2 cores, most of an idle server's SIGTERM-to-exit time. Only the logs are flushed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _bench(args: argparse.Namespace) -> int:
    from server.bench import main as bench_main

    return bench_main(args)


def _train(args: argparse.Namespace) -> int:
    import torch

    from server.engine.model import UnsupportedModel, load_base_model
    from training import TrainConfig, TrainingError, train

    try:
        cfg = TrainConfig(
            data=Path(args.data), out=Path(args.out), model=args.model, method=args.method,
            num_virtual_tokens=args.num_virtual_tokens, prefix_projection=args.prefix_projection,
            encoder=args.encoder, encoder_hidden_size=args.encoder_hidden_size, epochs=args.epochs,
            steps=args.steps, lr=args.lr, batch_size=args.batch_size,
            eval=Path(args.eval) if args.eval else None, seed=args.seed, init_from=args.init_from,
            server=args.upload, task=args.task,
        )
        base = load_base_model(cfg.model, DTYPES[args.dtype], args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        result = train(cfg, base)
    except (TrainingError, UnsupportedModel, ValueError) as exc:
        print(f"prefix-serve train: {exc}", file=sys.stderr)
        return 2
    print(f"saved PEFT adapter to {result.out}")
    if result.upload is not None:
        print(f"uploaded as task {result.upload['task']!r} version {result.upload['version']}")
    return 0


def _example(args: argparse.Namespace) -> int:
    from server.engine.model import UnsupportedModel, load_base_model
    from server.example import make_example

    try:
        base = load_base_model(args.model, DTYPES["float32"], "cpu")
    except UnsupportedModel as exc:
        print(f"prefix-serve example: {exc}", file=sys.stderr)
        return 2
    for path in make_example(Path(args.out), base.model):
        print(f"wrote {path}")
    return 0


def _add_serve(sub, defaults: Settings) -> None:
    serve = sub.add_parser("serve", help="start the HTTP server")
    serve.set_defaults(func=_serve)
    _add_serve_model_args(serve.add_argument_group("model and engine"), defaults)
    _add_serve_store_args(serve.add_argument_group("task store"), defaults)
    _add_serve_http_args(serve.add_argument_group("HTTP, limits and tenants"), defaults)


def _add_serve_model_args(group, defaults: Settings) -> None:
    """What is served and how the engine process computes it."""
    group.add_argument("--model", default=defaults.model,
                       help="'default' (embedded SmolLM2-135M-Instruct) or a local Hugging Face model folder")
    group.add_argument("--served-model-name", nargs="+", metavar="NAME",
                       help="the name(s) the API serves the base model under: the first is the one "
                       "/v1/models lists and /healthz reports, each is accepted as a request's model "
                       "(default: HuggingFaceTB/SmolLM2-135M-Instruct for the embedded model, also "
                       "accepted as SmolLM2-135M-Instruct; a folder's name for a folder)")
    group.add_argument("--dtype", default=defaults.dtype, choices=["auto", *sorted(DTYPES)],
                       help="auto: bfloat16 where the CPU has avx512_bf16 or amx_bf16, else float32")
    group.add_argument("--device", default=defaults.device, help="cpu or cuda")
    group.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    group.add_argument("--kv-cache-bytes", type=int, default=defaults.kv_cache_bytes)
    group.add_argument("--max-step-tokens", type=int, default=defaults.max_step_tokens,
                       help="tokens one forward computes: the running requests' next tokens plus chunks of "
                       "joining prompts (bounds how long a long prompt delays everyone else's next token)")
    group.add_argument("--block-size", type=int, default=defaults.block_size,
                       help="token slots per block of the paged key/value cache")
    group.add_argument("--no-prefix-caching", action="store_true",
                       help="compute every prompt in full (no reuse of cached prompt blocks)")
    group.add_argument("--share-prefix-cache", action="store_true",
                       help="let tenants reuse each other's cached prompt blocks (faster, but the time to "
                       "first token then tells a tenant which prompts another tenant sent)")
    group.add_argument("--long-prefill-threshold", type=int, default=defaults.long_prefill_threshold,
                       help="a prompt with more tokens left to prefill gets at most this many per step while "
                       "others need the step (0: half of --max-step-tokens)")
    group.add_argument("--max-long-prefills", type=int, default=defaults.max_long_prefills,
                       help="prompts longer than --long-prefill-threshold that prefill at once (vLLM's "
                       "--max-num-partial-prefills); more wait their turn, short prompts go ahead of them")
    group.add_argument("--threads", type=int, default=defaults.threads,
                       help="the engine process's torch threads "
                       "(0: one per core but one, left to the HTTP process)")
    group.add_argument("--omp-wait-policy", default=defaults.omp_wait_policy, choices=list(OMP_WAIT_POLICIES),
                       help="OpenMP wait policy of the engine process")
    group.add_argument("--engine-stall-timeout", type=float, default=defaults.engine_stall_timeout,
                       help="seconds the engine process may go without a step or heartbeat before it is "
                       "replaced (in-flight requests get 503)")
    group.add_argument("--engine-max-restarts", type=int, default=defaults.engine_max_restarts,
                       help="engine replacements allowed in any 60 s; past it the server exits non-zero")


def _add_serve_store_args(group, defaults: Settings) -> None:
    """Where tasks are kept and cached."""
    group.add_argument("--store-dir", default=str(defaults.store_dir), help="where uploaded tasks are kept")
    group.add_argument("--cache-bytes", type=int, default=defaults.cache_bytes,
                       help="memory budget for resident prefixes")
    group.add_argument("--host-cache-bytes", type=int, default=defaults.host_cache_bytes,
                       help="host-memory budget for prefixes evicted from the device "
                       "(ignored with --device cpu)")
    group.add_argument("--redis-url", default=None,
                       help="Redis shared by all replicas (e.g. redis://127.0.0.1:6379/0): a task uploaded "
                       "to one is served by all; without it each server has its --store-dir alone")
    group.add_argument("--redis-reconcile-interval", type=float, default=defaults.redis_reconcile_interval,
                       help="seconds between each replica's checks that Redis still holds its tasks and "
                       "deletes; what Redis lost (flush, failover, eviction) is pushed back")
    group.add_argument("--max-upload-bytes", type=int, default=defaults.max_upload_bytes)


def _add_serve_http_args(group, defaults: Settings) -> None:
    """The HTTP process: address, request limits, tenants, shutdown."""
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--auth-file", help="JSON with tenants, API keys, quotas and admin keys; "
                       "without it the server is open (single-user mode)")
    group.add_argument("--max-waiting-requests", type=int, default=None,
                       help="requests waiting for the batch beyond which new ones get 503 + Retry-After "
                       "(default: 2 x --max-batch-size)")
    group.add_argument("--request-timeout", type=float, default=None,
                       help="default deadline in seconds for a request to join the batch "
                       "(per request: timeout)")
    group.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout,
                       help="on SIGTERM, seconds in-flight requests may take before they are cancelled")
    group.add_argument("--log-level", default="info")
    group.add_argument("--timeout-keep-alive", type=float, default=5.0,
                       help="seconds an idle keep-alive connection stays open")
    group.add_argument("--max-connections", type=int, default=1024,
                       help="open connections (and requests) beyond which new ones get a 503 (0: no cap)")
    group.add_argument("--max-request-tokens", type=int, default=defaults.max_request_tokens,
                       help="prompt tokens one request may ask for across its prompts and n choices "
                       "(0: four times the model's context); checked before anything is computed")
    group.add_argument("--max-tool-prompt-tokens", type=int, default=defaults.max_tool_prompt_tokens,
                       help="tokens a chat request's tools may take in its prompt (0: half the model's "
                       "context); counted before the conversation is rendered, after the 128-tool and "
                       "byte caps")
    group.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                       help="largest JSON request body; larger ones are refused with 413 as they stream in "
                       "(uploads have --max-upload-bytes)")
    group.add_argument("--public-metrics", action="store_true",
                       help="with --auth-file: serve /metrics without a key "
                       "(per-tenant request counts and latencies)")
    group.add_argument("--public-docs", action="store_true",
                       help="with --auth-file: serve /docs, /redoc and /openapi.json without a key "
                       "(the API schema)")


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="learn a prefix for a task (saves a PEFT adapter folder)")
    train.add_argument("--data", required=True, help='JSONL: {"prompt", "completion"} or {"messages": [...]}')
    train.add_argument("--out", required=True, help="folder for the PEFT adapter")
    train.add_argument("--model", default="default")
    train.add_argument("--method", default="prefix", choices=["prefix", "p-tuning", "prompt"])
    train.add_argument("--num-virtual-tokens", type=int, default=16)
    train.add_argument("--prefix-projection", action="store_true",
                       help="train prefix-tuning through an MLP (ChatGLM PrefixEncoder style), "
                       "folded on save")
    train.add_argument("--encoder", default="mlp", choices=["mlp", "lstm"], help="p-tuning prompt encoder")
    train.add_argument("--encoder-hidden-size", type=int, default=128)
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int)
    length.add_argument("--steps", type=int)
    train.add_argument("--lr", type=float, default=1e-2)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--eval", help="held-out JSONL: eval loss and exact-match accuracy per epoch")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--init-from",
                       help="start from an existing prefix: a folder/file, or a task on --upload")
    train.add_argument("--upload", help="prefix-serve URL to upload the result to (with --task)")
    train.add_argument("--task", help="task name for --upload")
    train.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    train.add_argument("--device", default="cpu")
    train.add_argument("--threads", type=int, default=0)
    train.set_defaults(func=_train)


def _add_bench(sub, defaults: Settings) -> None:
    bench = sub.add_parser("bench", help="throughput and latency against the bare model and the alternatives")
    ints = lambda v: [int(x) for x in v.split(",")]
    bench.add_argument("--model", default="default",
                       help="'default', a local model folder, or a random-weight model of a real shape "
                       "built from its config (no download): random:tiny, random:llama-1b, random:llama-8b")
    bench.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument("--concurrency", type=int, default=32, help="batch size of the in-process comparisons")
    bench.add_argument("--batch-sizes", type=ints, default=None,
                       help="instead of the full benchmark: at each of these batch sizes the bare forward, "
                       "the engine on N tasks and on one, its per-step host overhead, and the server over "
                       "HTTP (the GPU check)")
    bench.add_argument("--prompt-tokens", type=int, default=32)
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--virtual-tokens", type=int, default=16)
    bench.add_argument("--rounds", type=int, default=3)
    bench.add_argument("--max-step-tokens", type=int, default=defaults.max_step_tokens,
                       help="the engine's token budget per forward (as serve --max-step-tokens)")
    bench.add_argument("--serial-requests", type=int, default=4,
                       help="requests timed for the one-at-a-time `generate` baseline")
    bench.add_argument("--scale-tasks", type=ints, default=[1, 10, 100, 1000])
    bench.add_argument("--sweep", type=ints, default=[1, 4, 16, 32], help="HTTP concurrency levels")
    bench.add_argument("--rate", type=float, default=2.0,
                       help="Poisson arrival rate (requests/s) for the HTTP run")
    bench.add_argument("--no-http", action="store_true", help="skip the real-server load test")
    bench.add_argument("--no-kv", action="store_true",
                       help="skip the key/value memory workloads (length mix, shared preamble, long "
                       "neighbour)")
    bench.add_argument("--no-overload", action="store_true",
                       help="skip the overload section "
                       "(decode while requests wait, beside a CPU hog; a burst)")
    bench.add_argument("--overload-waiting", type=ints, default=[0, 64, 128, 256],
                       help="queue depths behind a full batch for the overload section")
    bench.add_argument("--overload-window", type=float, default=8.0, help="seconds each decode figure spans")
    bench.add_argument("--out", default=None,
                       help="results folder (default server/bench/results; server/bench/results/gpu with "
                       "--batch-sizes; "
                       "with --url, remote.{json,md} are written only when given)")
    remote = bench.add_argument_group(
        "a running server (--url): only the load generator, at each --sweep concurrency")
    remote.add_argument("--url", help="base URL of a running prefix-serve server, e.g. http://127.0.0.1:8000")
    remote.add_argument("--duration", type=float, default=None,
                        help="seconds of load per concurrency (default: 4 requests per client)")
    remote.add_argument("--tasks", type=lambda v: [t for t in v.split(",") if t], default=None,
                        help="comma-separated tasks the server already serves (default: the base model)")
    remote.add_argument("--mix", default="uniform", choices=["uniform", "zipf", "distinct"],
                        help="how requests pick among --tasks")
    remote.add_argument("--api-key", default=None,
                        help="sent as a bearer token, for a server with --auth-file")
    bench.set_defaults(func=_bench)


def _add_example(sub) -> None:
    example = sub.add_parser(
        "example", help="write a small PEFT prefix-tuning adapter for the model, training data and an "
        "lm-eval task into a folder (the README's first task; nothing is downloaded)")
    example.add_argument("--out", default="example", help="the folder to write (created; files are replaced)")
    example.add_argument("--model", default="default",
                         help="the base model the adapter is for (as serve --model)")
    example.set_defaults(func=_example)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefix-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = Settings()
    _add_serve(sub, defaults)
    _add_train(sub)
    _add_bench(sub, defaults)
    _add_example(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
