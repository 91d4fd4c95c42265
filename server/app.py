"""Builds the FastAPI app: open the store, start the engine process, mount the routers."""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from prefixes.store import PrefixStore
from prefixes.validate import ArtifactLimits
from server.api import errors, generate, health, openai, prefixes, schemas, tokenize
from server.auth import AuthConfig
from server.config import Settings
from server.engine.model import served_names
from server.errors import Unauthenticated
from server.frontend.client import EngineClient, EngineLimits
from server.metrics import Metrics
from server.middleware import GatePolicy, RequestGate
from server.state import ServerState
from server.tasks import ConcurrencyLimiter

log = logging.getLogger(__name__)


def engine_environment(settings: Settings) -> dict[str, str]:
    """The engine process's environment: its own thread count and OpenMP wait policy."""
    env = dict(os.environ)
    if settings.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = settings.omp_wait_policy.upper()
    else:
        env.pop("OMP_WAIT_POLICY", None)
    env["OMP_NUM_THREADS"] = str(settings.engine_threads)
    return env


async def build_state(settings: Settings) -> ServerState:
    """Open the store and start the engine process (returns once its model is loaded)."""
    auth = AuthConfig.load(settings.auth_file) if settings.auth_file else AuthConfig.open()
    if auth.is_open:
        log.warning("no --auth-file: the server is OPEN (single-user mode); anyone who can reach it may "
                    "upload, delete and use tasks")
    # This process keeps prefixes as CPU tensors in the serving dtype: the engine process holds its own device
    # copies (--cache-bytes of them). On an accelerator the host-memory budget is this process's memory tier.
    on_cpu = settings.device == "cpu"
    store = PrefixStore(settings.store_dir, settings.cache_bytes if on_cpu else settings.host_cache_bytes,
                        prepare=lambda t: t.to(dtype=settings.torch_dtype), redis_url=settings.redis_url,
                        reconcile_interval=settings.redis_reconcile_interval)
    engine: EngineClient | None = None
    metrics = Metrics(store, lambda: engine.num_running if engine else 0,
                      lambda: engine.num_waiting if engine else 0)
    engine = EngineClient.for_model(
        settings.model, settings.dtype, settings.device, settings.engine_threads, settings.max_batch_size,
        settings.kv_cache_bytes, settings.max_step_tokens,
        EngineLimits(max_waiting=settings.waiting_limit, request_timeout=settings.request_timeout,
                     prefix_cache_bytes=settings.cache_bytes, stall_timeout=settings.engine_stall_timeout,
                     max_restarts=settings.engine_max_restarts),
        observer=metrics, env=engine_environment(settings), on_restart=metrics.engine_restarted,
        cache_options=settings.cache_options)
    try:
        base = await engine.start()
    except BaseException:
        await engine.close()
        store.close()
        raise
    limits = ArtifactLimits(max_virtual_tokens=settings.max_virtual_tokens)
    return ServerState(settings, base, engine, store, metrics, limits, auth,
                       ConcurrencyLimiter(on_reject=lambda tenant: metrics.rejected(tenant, "rate_limited")),
                       served_names(base.model_id, settings.served_model_name))


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The model computes in the engine process. This one only tokenizes and loads prefixes, each with one
        # torch thread, so that it never runs an OpenMP team of its own beside the engine's.
        torch.set_num_threads(1)
        state = await build_state(settings)
        app.state.server = state
        log.info("serving %s (%s, %s on %s) from engine process %s; store at %s", state.model_name,
                 state.base.shape.model_type, settings.dtype, settings.device, state.engine.pid,
                 settings.store_dir)
        try:
            yield
        finally:
            await state.engine.close()
            state.store.close()

    app = FastAPI(title="prefix-serve", version="0.1.0", lifespan=lifespan)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(prefixes.router)
    app.include_router(openai.router)
    app.include_router(tokenize.router)
    errors.add_openai_error_handlers(app)  # OpenAI's error shape under /v1; elsewhere unchanged
    errors.add_domain_error_handlers(app)  # after it: renders through its HTTPException handler
    add_request_gate(app, settings)
    serve_openapi_with_model_bounds(app)
    return app


def serve_openapi_with_model_bounds(app: FastAPI) -> None:
    """The schema at /openapi.json states the served vocabulary's bounds on token ids and the context's on
    tokens to generate (:func:`server.api.schemas.fill_model_bounds`); rendered once the model is loaded."""
    render = app.openapi  # FastAPI's: renders once, then returns app.openapi_schema
    filled = False

    def openapi() -> dict:
        nonlocal filled
        schema = render()
        state = getattr(app.state, "server", None)
        if not filled and state is not None:
            schemas.fill_model_bounds(schema, {"model": state.base.vocab_size,
                                               "tokenizer": len(state.base.tokenizer)},
                                      state.base.shape.max_positions)
            filled = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def add_request_gate(app: FastAPI, settings: Settings) -> None:
    """Request ids, authentication from the headers and body caps, before any route reads a byte (see
    :mod:`server.middleware`). The auth config is the one the lifespan loaded; errors are rendered by the
    app's own HTTPException handler (OpenAI's shape under /v1)."""

    def authenticate(scope, authorization: str | None):
        try:
            return scope["app"].state.server.auth.authenticate(authorization)
        except Unauthenticated as exc:  # the gate renders HTTPExceptions, before any route or handler
            raise errors.as_http(exc) from None

    async def render_error(request: Request, exc: StarletteHTTPException):
        handler = request.scope["app"].exception_handlers.get(StarletteHTTPException, http_exception_handler)
        return await handler(request, exc)

    app.add_middleware(RequestGate, policy=GatePolicy.from_settings(settings), authenticate=authenticate,
                       render_error=render_error)
