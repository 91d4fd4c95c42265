"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated

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
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1,
                             description="negative (clients send -1): unseeded")
    stop: list[str] = Field(default_factory=list, max_length=16)
    ignore_eos: bool = False
    stream: bool = Field(False, description="Server-Sent Events: text deltas and new token ids as generated")
    timeout: float | None = Field(None, ge=MIN_TIMEOUT_S, le=86400, description=TIMEOUT_HELP)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _stop_list(value)

    @field_validator("seed")
    @classmethod
    def _negative_is_unseeded(cls, value):
        return _seed(value)


def _seed(value: int | None) -> int | None:
    """vLLM's convention, which clients follow: a negative seed (usually -1) means "do not seed"."""
    return None if value is None or value < 0 else value


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


MAX_LOGPROBS = 20  # OpenAI's limit for ``logprobs`` / ``top_logprobs``
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(BaseModel):
    # Non-finite floats (JSON has none, but Python's parser reads NaN and Infinity) are refused up front.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=0, le=65536)  # 0 only with echo: prompt scoring
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1 - MAX_CHOICES)  # choice i is seeded seed + i
    stop: list[str] = Field(default_factory=list, max_length=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    timeout: float | None = Field(None, ge=MIN_TIMEOUT_S, le=86400, description=TIMEOUT_HELP)  # an extension
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # token id (a string) -> bias
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    response_format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    # vLLM's extensions, honoured because clients written for vLLM (lm-eval, guidellm) send them
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: no top-k cut
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(None, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # a Lark grammar

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return _stop_list(value)

    @field_validator("seed")
    @classmethod
    def _negative_is_unseeded(cls, value):
        return _seed(value)


class CompletionRequest(OpenAISampling):
    # a string, a list of strings, a list of token ids, or a list of token-id lists (one choice block each)
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a "tool" message: the call it answers
    name: str | None = None


class ChatCompletionRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=65536)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list | None = None  # checked by server/api/tools.py, which names the faulty field
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: str | dict | None = None
