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
    503: {"description": "the engine process is gone, or the server is draining"}
}


@router.get("/healthz", responses=_UNAVAILABLE)
@router.get("/health", responses=_UNAVAILABLE,
            include_in_schema=False)  # vLLM's name, which load generators and routers probe
async def healthz(state: State):
    """200 while the server takes requests; 503 once it cannot (engine process gone) or will not (draining on
    SIGTERM), so that a load balancer or Kubernetes takes it out of rotation."""
    engine = state.engine
    body = {"status": "ok", "model": state.base.model_id, "running": engine.num_running,
            "waiting": engine.num_waiting, "engine_threads": engine.engine_info["threads"]}
    if engine.unavailable is not None:
        return JSONResponse({**body, "status": "engine_down", "detail": engine.unavailable}, status_code=503)
    if engine.draining:
        return JSONResponse({**body, "status": "draining"}, status_code=503)
    return body


@router.get("/metrics", response_class=PlainTextResponse, responses=errors.responses(401, 403))
async def metrics(state: State):
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
