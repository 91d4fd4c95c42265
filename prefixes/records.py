"""What the store says about a task (TaskRecord) and a task ready to serve (ResidentPrefix).

Neither imports the store: the engine, the HTTP layer and training use them without the store's tiers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.keys import split_key

# The persisted form (meta.json on disk, the ``meta`` field in Redis) names the key "task", as it did
# before the field was renamed: stores and replicas written by earlier versions still read alike.
_PERSISTED_KEY = "task"


@dataclass(frozen=True, slots=True)
class TaskRecord:
    key: str  # the store key, e.g. "acme~summary"; ``name`` is the part its owner sees
    kind: str
    num_virtual_tokens: int
    sha256: str
    version: int
    bytes: int
    source_format: str
    created_at: float

    @classmethod
    def describe(cls, key: str, artifact: PrefixArtifact, version: int,
                 sha256: str | None = None) -> TaskRecord:
        return cls(key=key, kind=artifact.kind.value, num_virtual_tokens=artifact.num_virtual_tokens,
                   sha256=artifact.sha256() if sha256 is None else sha256, version=version,
                   bytes=artifact.nbytes, source_format=artifact.source_format, created_at=time.time())

    def as_json(self) -> dict[str, Any]:
        """The persisted form (see ``_PERSISTED_KEY``)."""
        fields = asdict(self)
        fields[_PERSISTED_KEY] = fields.pop("key")
        return fields

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> TaskRecord:
        fields = dict(fields)
        return cls(key=fields.pop(_PERSISTED_KEY), **fields)

    @property
    def name(self) -> str:
        """The task's name as its owner sees it (the key without the namespace)."""
        return split_key(self.key)[1]

    @property
    def namespace(self) -> str | None:
        return split_key(self.key)[0]


def same_version(a: TaskRecord | None, b: TaskRecord | None) -> bool:
    """Both exist and serve identically: same version number and same tensor digest."""
    return a is not None and b is not None and a.version == b.version and a.sha256 == b.sha256


@dataclass(frozen=True, slots=True)
class ResidentPrefix:
    """A task ready for the engine: its record and its tensor already on the serving device and dtype."""

    record: TaskRecord
    kind: PrefixKind
    tensor: torch.Tensor  # see prefixes.artifact for the shape of each kind

    @property
    def num_virtual_tokens(self) -> int:
        return self.record.num_virtual_tokens

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @classmethod
    def unstored(cls, key: str, artifact: PrefixArtifact) -> ResidentPrefix:
        """A servable task that never went through a store (training evaluation, benchmarks, tests):
        version 0, its tensor as it is (move it to the serving device and dtype first)."""
        return cls(TaskRecord.describe(key, artifact, version=0), artifact.kind, artifact.tensor)
