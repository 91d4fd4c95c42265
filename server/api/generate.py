"""POST /generate: one completion for one task (or the bare base model)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException, Query, Request

from server.api.schemas import GenerateRequest, GenerateResponse, Usage
from server.engine.engine import ContextTooLong
from server.engine.sequence import FinishReason, SamplingParams, Sequence
from server.auth import CurrentPrincipal
from server.state import ServerState, State
from server.tasks import resolve_prefix

router = APIRouter(tags=["generate"])


DISCONNECT_POLL_S = 0.25


async def run_sequence(state: ServerState, seq: Sequence, request: Request) -> Sequence:
    """Submit ``seq`` to the engine and wait for it. A client that goes away cancels it, freeing its slot."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Sequence] = loop.create_future()

    def on_finish(finished: Sequence) -> None:  # runs on the engine thread
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(finished))

    seq.on_finish = on_finish
    try:
        state.engine.submit(seq)
    except ContextTooLong as exc:
        state.metrics.rejected(seq.tenant, "rejected")
        raise HTTPException(400, str(exc)) from None
    try:
        while not done.done():
            await asyncio.wait([done], timeout=DISCONNECT_POLL_S)
            if not done.done() and await request.is_disconnected():
                state.engine.cancel(seq)
                await done  # the engine confirms at its next step; the slot is free from then on
    except asyncio.CancelledError:
        state.engine.cancel(seq)
        raise
    if seq.finish_reason is FinishReason.ERROR:
        raise HTTPException(500, seq.error or "generation failed")
    return seq


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, state: State, request: Request, principal: CurrentPrincipal,
                   task: str | None = Query(None, description="task name; omit for the base model")):
    prefix = await resolve_prefix(state.store, principal, task)
    prompt_ids = state.base.tokenizer(body.prompt)["input_ids"]
    try:
        params = SamplingParams(
            max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
            top_k=body.top_k, seed=body.seed, stop=tuple(body.stop), ignore_eos=body.ignore_eos,
        )
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    async with state.limiter.slot(principal):
        seq = await run_sequence(state, Sequence(prompt_ids, params, prefix, tenant=principal.tenant), request)
    return GenerateResponse(
        task=task, text=seq.text or "", token_ids=seq.output_ids, finish_reason=seq.finish_reason.value,
        usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(seq.output_ids)),
    )
