"""Liveness and metrics for operators."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.state import State

router = APIRouter(tags=["operations"])


@router.get("/healthz")
@router.get("/health")  # vLLM's name, which load generators and routers probe
async def healthz(state: State):
    return {"status": "ok", "model": state.base.model_id, "running": state.engine.num_running,
            "waiting": state.engine.num_waiting}


@router.get("/metrics")
async def metrics(state: State):
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
