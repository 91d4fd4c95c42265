"""Builds the FastAPI app: load the model, open the store, start the engine, mount the routers."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from prefixes.store import PrefixStore
from prefixes.validate import ArtifactLimits
from server.api import generate, health, openai, prefixes, tokenize
from server.auth import AuthConfig
from server.config import Settings
from server.engine.engine import Engine, EngineConfig
from server.engine.model import BaseModel, load_base_model
from server.metrics import Metrics
from server.state import ServerState
from server.tasks import ConcurrencyLimiter

log = logging.getLogger(__name__)


def build_state(settings: Settings, base: BaseModel | None = None) -> ServerState:
    auth = AuthConfig.load(settings.auth_file) if settings.auth_file else AuthConfig.open()
    if auth.is_open:
        log.warning("no --auth-file: the server is OPEN (single-user mode); anyone who can reach it may "
                    "upload, delete and use tasks")
    if base is None:
        base = load_base_model(settings.model, settings.torch_dtype, settings.device)
    # A host-memory tier only helps when prefixes are served from an accelerator: on a CPU device the
    # device tier already is host memory, so it is skipped there.
    store = PrefixStore(settings.store_dir, settings.cache_bytes,
                        prepare=lambda t: t.to(device=base.device, dtype=base.dtype),
                        host_cache_bytes=0 if base.device.type == "cpu" else settings.host_cache_bytes,
                        redis_url=settings.redis_url)
    metrics = Metrics(store, lambda: engine.num_running, lambda: engine.num_waiting)
    engine = Engine(base, EngineConfig(max_batch_size=settings.max_batch_size,
                                       kv_cache_bytes=settings.kv_cache_bytes,
                                       max_step_tokens=settings.max_step_tokens), observer=metrics)
    limits = ArtifactLimits(max_virtual_tokens=settings.max_virtual_tokens)
    return ServerState(settings, base, engine, store, metrics, limits, auth,
                       ConcurrencyLimiter(on_reject=lambda tenant: metrics.rejected(tenant, "rate_limited")))


def create_app(settings: Settings, base: BaseModel | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Only the engine thread computes with several torch threads. Every other thread (this one, which
        # loads the model; the request threads, which load prefixes) stays single-threaded: a second
        # multi-threaded OpenMP team in the process makes the runtime cut its workers' spin-waits, which
        # measurably slows every forward of the engine on a small CPU.
        threads = settings.threads or torch.get_num_threads()
        torch.set_num_threads(1)
        state = build_state(settings, base)
        app.state.server = state
        state.engine.start(threads)
        torch.set_num_threads(1)  # threads started from now on default to one again (the engine keeps its own)
        log.info("serving %s (%s, %s on %s); store at %s", state.base.model_id, state.base.shape.model_type,
                 settings.dtype, settings.device, settings.store_dir)
        try:
            yield
        finally:
            state.engine.stop()
            state.store.close()

    app = FastAPI(title="prefix-serve", version="0.1.0", lifespan=lifespan)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(prefixes.router)
    app.include_router(openai.router)
    app.include_router(tokenize.router)
    openai.add_exception_handlers(app)  # OpenAI's error shape under /v1; elsewhere unchanged
    return app
