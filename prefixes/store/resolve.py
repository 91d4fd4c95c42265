"""Which version of a task to serve: a pure decision over what Redis and this replica know (no I/O).

Redis is the authority, except where this replica holds a write Redis has not seen: Redis unreachable or
without the task, a pending outage write later than Redis's last write, or a local version above Redis's
(written here, not yet published). Without Redis the store asks with ``remote=None, reachable=True``:
nothing beyond the local disk exists, so the local record is served.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from prefixes.records import TaskRecord
from prefixes.store.redis_layout import RemoteState


@dataclass(frozen=True, slots=True)
class Pending:
    """A put or delete made here while Redis was unreachable, not yet pushed to it
    (``pending/<key>.json``)."""

    op: Literal["put", "delete"]
    at: float  # wall-clock time of the write: against Redis's ``at``, the later write wins
    sha256: str | None = None  # put: the digest written, so a resync can tell whether the write completed
    version: int = 0  # delete: the version deleted, the tombstone's floor

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> Pending:
        if fields.get("op") not in ("put", "delete"):
            raise ValueError(f"unexpected marker {fields!r}")
        return cls(op=fields["op"], at=float(fields["at"]), sha256=fields.get("sha256"),
                   version=int(fields.get("version", 0)))


def resolve(remote: RemoteState | None, reachable: bool, pending: Pending | None,
            local: TaskRecord | None) -> TaskRecord | None:
    """The record to serve, given Redis's state of the key (``reachable``: whether Redis answered), this
    replica's unpushed write and its local record (disk or resident); None: the task does not exist."""
    if not reachable:
        return local
    if pending is not None:
        if remote is None or remote.at <= pending.at:  # the outage write is the last one
            return local if pending.op == "put" else None
    elif remote is None or (local is not None and local.version > remote.version):
        return local
    assert remote is not None
    if remote.deleted or remote.meta is None:
        return None
    return TaskRecord.from_json(remote.meta)
