"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is an error, not silently ignored

    prompt: str
    max_new_tokens: int = Field(64, ge=1, le=65536)
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        if isinstance(value, str):
            value = [value]
        if value is None:
            return []
        if isinstance(value, list) and any(isinstance(s, str) and not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    task: str | None
    text: str
    token_ids: list[int]  # generated ids only (an EOS that ended generation included)
    finish_reason: str
    usage: Usage


class PrefixInfo(BaseModel):
    task: str
    kind: str
    num_virtual_tokens: int
    sha256: str
    version: int
    bytes: int
    source_format: str
    created_at: float
    owner: str | None = None  # the owning tenant's namespace; "_shared" for admin-published tasks


class PrefixList(BaseModel):
    prefixes: list[PrefixInfo]
