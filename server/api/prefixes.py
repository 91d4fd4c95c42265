"""Prefix artifacts: upload (any supported format), list, inspect, download, delete."""

from __future__ import annotations

import os
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from prefixes.formats import InvalidArtifact, parse_artifact
from prefixes.records import TaskRecord
from prefixes.store import TaskNotFound
from prefixes.validate import validate_artifact
from server.api import errors
from server.api.schemas import PrefixInfo, PrefixList, TaskPath, TenantQuery
from server.auth import CurrentPrincipal, Principal
from server.state import ServerState, State
from server.tasks import resolve_record, storage_quota, visible_records, write_key

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
            raise HTTPException(400, f"File {name!r} was uploaded twice; send each file of the artifact "
                                "once.")
        parts = []
        while chunk := await upload.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise HTTPException(413, f"Upload exceeds {limit} bytes; a prefix artifact is far smaller.")
            parts.append(chunk)
        out[name] = b"".join(parts)
    return out


def info(record: TaskRecord) -> dict:
    """A record as its owner sees it: the plain task name, plus who owns it."""
    return {**record.as_json(), "task": record.name, "owner": record.namespace}


def _store_artifact(state: ServerState, principal: Principal, key: str,
                    files: dict[str, bytes]) -> TaskRecord:
    artifact = parse_artifact(files, state.base.shape)
    validate_artifact(artifact, state.base.shape, state.limits)
    return state.store.put(key, artifact, quota=storage_quota(principal))  # QuotaExceeded: see api.errors


@router.post("/{task}", status_code=201, response_model=PrefixInfo,
             responses=errors.responses(400, 401, 403, 404, 413, 429, 503, 507))
async def upload_prefix(task: TaskPath, state: State, principal: CurrentPrincipal,
                        files: Annotated[list[UploadFile], File(json_schema_extra={"minItems": 1})],
                        tenant: TenantQuery = None):
    key = write_key(state.auth, principal, task, tenant)
    contents = await read_upload(files, state.settings.max_upload_bytes)
    try:
        record = await run_in_threadpool(_store_artifact, state, principal, key, contents)
    except InvalidArtifact as exc:
        raise HTTPException(400, f"Invalid artifact for task {task!r}: {exc}") from None
    return info(record)


@router.get("", response_model=PrefixList, responses=errors.responses(401))
async def list_prefixes(state: State, principal: CurrentPrincipal):
    records = await run_in_threadpool(visible_records, state.store, principal)
    return {"prefixes": [info(r) for r in records]}


@router.get("/{task}", response_model=PrefixInfo, responses=errors.responses(400, 401, 404, 503))
async def get_prefix(task: TaskPath, state: State, principal: CurrentPrincipal):
    return info(await resolve_record(state.store, principal, task))


@router.get("/{task}/artifact", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}},
                       **errors.responses(400, 401, 404, 503)})
async def download_prefix(task: TaskPath, state: State, principal: CurrentPrincipal):
    """The task's served tensors in prefix-serve's format (re-uploadable; a start for `train --init-from`)."""
    record = await resolve_record(state.store, principal, task)
    try:
        data = await run_in_threadpool(state.store.read_artifact, record.key)
    except TaskNotFound:
        raise HTTPException(404, f"Unknown task {task!r}.") from None
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{record.name}.safetensors"'})


@router.delete("/{task}", status_code=204, responses=errors.responses(400, 401, 403, 404, 503))
async def delete_prefix(task: TaskPath, state: State, principal: CurrentPrincipal,
                        tenant: TenantQuery = None):
    key = write_key(state.auth, principal, task, tenant)
    try:
        await run_in_threadpool(state.store.delete, key)
    except TaskNotFound:
        raise HTTPException(404, f"Unknown task {task!r}.") from None
    return Response(status_code=204)
