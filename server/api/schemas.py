"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


# A deadline shorter than this could pass before an idle server's next step admits the request: a client
# error (422), not a 503 for a server that was never busy.
MIN_TIMEOUT_S = 0.1
TIMEOUT_HELP = ("seconds this request may wait for a place in the batch (default: the server's "
                "--request-timeout); past it, it leaves the queue unserved with a 503")


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
    stream: bool = Field(False, description="Server-Sent Events: text deltas and new token ids as generated")
    timeout: float | None = Field(None, ge=MIN_TIMEOUT_S, le=86400, description=TIMEOUT_HELP)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _stop_list(value)


def _stop_list(value):
    """``stop`` may be one string or a list; empty strings would stop at once, so they are an error."""
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


# ---------------------------------------------------------------------------------------------------------
# OpenAI-compatible bodies. Unknown fields are ignored (clients send many this server has no use for); the
# meaningful ones it cannot honour are refused by the routes. ``None`` means "not sent": clients send nulls.

MAX_CHOICES = 16  # ``n``: one request may not take over the batch


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=65536)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=0, le=2**63 - 1 - MAX_CHOICES)  # choice i is seeded seed + i
    stop: list[str] = Field(default_factory=list, max_length=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    timeout: float | None = Field(None, ge=MIN_TIMEOUT_S, le=86400, description=TIMEOUT_HELP)  # an extension of ours
    # vLLM's extensions, honoured because they cost nothing: clients written for vLLM send them
    top_k: int | None = Field(None, ge=0)
    ignore_eos: bool | None = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _stop_list(value)


class CompletionRequest(OpenAISampling):
    prompt: str | list = Field(..., description="a string, or a list holding one string")
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=65536)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
