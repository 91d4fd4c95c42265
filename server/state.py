"""What the HTTP layer needs, built once at start-up and reached through FastAPI dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from prefixes.store import PrefixStore
from prefixes.validate import ArtifactLimits
from server.auth import AuthConfig
from server.config import Settings
from server.frontend.client import EngineClient, ServedModel
from server.metrics import Metrics
from server.tasks import ConcurrencyLimiter


@dataclass(slots=True)
class ServerState:
    settings: Settings
    base: ServedModel  # the tokenizer and the model's shape; the weights live in the engine process
    engine: EngineClient
    store: PrefixStore
    metrics: Metrics
    limits: ArtifactLimits
    auth: AuthConfig
    limiter: ConcurrencyLimiter
    # the names the API serves the base model under (server.engine.model.served_names): the first is listed
    served_names: tuple[str, ...] = ()

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name a request may give the base model by."""
        return self.served_names or (self.base.model_id,)

    @property
    def model_name(self) -> str:
        """The base model's name in /v1/models and /healthz."""
        return self.model_names[0]


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]
