"""Prefix artifacts: upload (any supported format), list, inspect, delete."""

from __future__ import annotations

import os

from fastapi import APIRouter, File, HTTPException, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from prefixes.formats import InvalidArtifact, parse_artifact
from prefixes.store import InvalidTaskName, TaskNotFound, TaskRecord, check_task_name
from prefixes.validate import validate_artifact
from server.api.schemas import PrefixInfo, PrefixList
from server.state import ServerState, State

router = APIRouter(prefix="/prefixes", tags=["prefixes"])
_CHUNK = 1 << 20


async def read_upload(files: list[UploadFile], limit: int) -> dict[str, bytes]:
    """Name -> bytes for each uploaded file; folder parts of names are dropped (a PEFT folder upload)."""
    out: dict[str, bytes] = {}
    total = 0
    for upload in files:
        name = os.path.basename((upload.filename or "").replace("\\", "/"))
        if not name:
            raise HTTPException(400, "Every uploaded file needs a file name (e.g. adapter_config.json).")
        if name in out:
            raise HTTPException(400, f"File {name!r} was uploaded twice; send each file of the artifact once.")
        parts = []
        while chunk := await upload.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise HTTPException(413, f"Upload exceeds {limit} bytes; a prefix artifact is far smaller.")
            parts.append(chunk)
        out[name] = b"".join(parts)
    return out


def _store_artifact(state: ServerState, task: str, files: dict[str, bytes]) -> TaskRecord:
    artifact = parse_artifact(files, state.base.shape)
    validate_artifact(artifact, state.base.shape, state.limits)
    return state.store.put(task, artifact)


def _task_name(task: str) -> str:
    try:
        return check_task_name(task)
    except InvalidTaskName as exc:
        raise HTTPException(400, str(exc)) from None


@router.post("/{task}", status_code=201, response_model=PrefixInfo)
async def upload_prefix(task: str, state: State, files: list[UploadFile] = File(...)):
    task = _task_name(task)
    contents = await read_upload(files, state.settings.max_upload_bytes)
    try:
        record = await run_in_threadpool(_store_artifact, state, task, contents)
    except InvalidArtifact as exc:
        raise HTTPException(400, f"Invalid artifact for task {task!r}: {exc}") from None
    return record.as_json()


@router.get("", response_model=PrefixList)
async def list_prefixes(state: State):
    records = await run_in_threadpool(state.store.list)
    return {"prefixes": [r.as_json() for r in records]}


@router.get("/{task}", response_model=PrefixInfo)
async def get_prefix(task: str, state: State):
    try:
        return (await run_in_threadpool(state.store.info, _task_name(task))).as_json()
    except TaskNotFound:
        raise HTTPException(404, f"Unknown task {task!r}.") from None


@router.get("/{task}/artifact", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def download_prefix(task: str, state: State):
    """The task's served tensors in prefix-serve's format (re-uploadable; a start for `train --init-from`)."""
    try:
        data = await run_in_threadpool(state.store.read_artifact, _task_name(task))
    except TaskNotFound:
        raise HTTPException(404, f"Unknown task {task!r}.") from None
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{task}.safetensors"'})


@router.delete("/{task}", status_code=204)
async def delete_prefix(task: str, state: State):
    try:
        await run_in_threadpool(state.store.delete, _task_name(task))
    except TaskNotFound:
        raise HTTPException(404, f"Unknown task {task!r}.") from None
    return Response(status_code=204)
