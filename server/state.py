"""What the HTTP layer needs, built once at start-up and reached through FastAPI dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from prefixes.store import PrefixStore
from prefixes.validate import ArtifactLimits
from server.auth import AuthConfig
from server.config import Settings
from server.engine.engine import Engine
from server.engine.model import BaseModel
from server.metrics import Metrics
from server.tasks import ConcurrencyLimiter


@dataclass(slots=True)
class ServerState:
    settings: Settings
    base: BaseModel
    engine: Engine
    store: PrefixStore
    metrics: Metrics
    limits: ArtifactLimits
    auth: AuthConfig
    limiter: ConcurrencyLimiter


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]
