"""POST /generate: one completion for one task (or the bare base model), whole or streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Request

from server.api import errors
from server.api.encode import encode_prompt
from server.api.schemas import STREAMED, GenerateRequest, GenerateResponse, TaskQuery, Usage
from server.api.streaming import Piece, open_stream, run_to_end
from server.auth import CurrentPrincipal
from server.engine.sequence import SamplingParams
from server.frontend.request_state import RequestState
from server.state import State
from server.tasks import resolve_prefix

router = APIRouter(tags=["generate"])


async def _chunks(pieces: AsyncIterator[Piece], prompt_tokens: int) -> AsyncIterator[dict]:
    completion_tokens = 0
    async for piece in pieces:
        completion_tokens += len(piece.token_ids)
        chunk: dict[str, object] = {"text": piece.text, "token_ids": piece.token_ids}
        if piece.finish_reason is not None:
            chunk["finish_reason"] = piece.finish_reason
            chunk["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        yield chunk


@router.post("/generate", response_model=GenerateResponse,
             responses={**STREAMED, **errors.responses(400, 401, 404, 413, 429, 503)})
async def generate(body: GenerateRequest, state: State, request: Request, principal: CurrentPrincipal,
                   task: TaskQuery = None):
    prefix = await resolve_prefix(state.store, principal, task)
    prompt_ids = await encode_prompt(state, body.prompt)
    try:
        params = SamplingParams(
            max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
            top_k=body.top_k, seed=body.seed, stop=tuple(body.stop), ignore_eos=body.ignore_eos,
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    seq = RequestState(prompt_ids, params, prefix, tenant=principal.tenant)
    if body.timeout is not None:
        seq.deadline = seq.arrival_time + body.timeout
    if body.stream:
        return await open_stream(state, principal, [seq], lambda pieces: _chunks(pieces, len(prompt_ids)))
    [seq] = await run_to_end(state, principal, request, [seq])
    assert seq.finish_reason is not None, "run_to_end returns finished sequences"
    return GenerateResponse(
        task=task, text=seq.text, token_ids=seq.output_ids, finish_reason=seq.finish_reason.value,
        usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(seq.output_ids)),
    )
