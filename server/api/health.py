"""Liveness and metrics for operators."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api import errors
from server.state import State

router = APIRouter(tags=["operations"])


_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"description": "the engine process stalled or died and is being replaced (with Retry-After), it is "
                         "down for good, or the server is draining",
          "headers": {"Retry-After": {"description": "seconds until a replacement engine should serve",
                                      "schema": {"type": "integer"}}}}
}


@router.get("/healthz", responses=_UNAVAILABLE)
@router.get("/health", responses=_UNAVAILABLE,
            include_in_schema=False)  # vLLM's name, which load generators and routers probe
async def healthz(state: State):
    """200 while the server takes requests; 503 while it cannot or will not, so that a load balancer or
    Kubernetes takes it out of rotation: ``engine_stalled`` (the engine process made no progress for
    --engine-stall-timeout seconds) or ``engine_restarting`` (it died) while a replacement starts, with a
    ``Retry-After`` of the time that should take; ``engine_down`` once it was replaced too often (the server
    exits); ``draining`` after SIGTERM."""
    engine = state.engine
    body = {"status": "ok", "model": state.model_name, "running": engine.num_running,
            "waiting": engine.num_waiting, "engine_threads": engine.engine_info.get("threads"),
            "engine_restarts": engine.supervisor.restarts}
    if engine.unavailable is not None:
        retry_after = engine.retry_after
        return JSONResponse({**body, "status": engine.supervisor.status, "detail": engine.unavailable},
                            status_code=503,
                            headers={"Retry-After": str(retry_after)} if retry_after is not None else None)
    if engine.draining:
        return JSONResponse({**body, "status": "draining"}, status_code=503)
    return body


@router.get("/metrics", response_class=PlainTextResponse,
            responses=errors.responses(401, 403, text_route=True))
async def metrics(state: State):
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
