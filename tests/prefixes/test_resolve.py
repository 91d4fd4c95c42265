"""resolve(): which version of a task a replica serves, from what Redis and the replica know. No I/O."""

from __future__ import annotations

import pytest

from prefixes.records import TaskRecord
from prefixes.store.redis_layout import RemoteState
from prefixes.store.resolve import Pending, resolve


def record(version: int, sha256: str = "aa", at: float = 100.0) -> TaskRecord:
    return TaskRecord(key="acme~t", kind="prefix_tuning", num_virtual_tokens=4, sha256=sha256,
                      version=version, bytes=1024, source_format="peft", created_at=at)


def live(version: int, sha256: str = "bb", at: float = 100.0) -> RemoteState:
    return RemoteState(version=version, deleted=False, at=at, sha256=sha256,
                       meta=record(version, sha256, at).as_json())


def tombstone(version: int, at: float = 100.0) -> RemoteState:
    return RemoteState(version=version, deleted=True, at=at)


LOCAL = record(3)
REMOTE = "remote"  # expected: the record Redis holds

CASES = [
    # (case, remote, reachable, pending, local, expected)
    ("no Redis (or it has never heard of the task): the local copy", None, True, None, LOCAL, LOCAL),
    ("no Redis, no local copy: not found", None, True, None, None, None),
    ("Redis unreachable: the local copy", live(9), False, None, LOCAL, LOCAL),
    ("Redis unreachable, no local copy: not found here", None, False, None, None, None),
    ("Redis unreachable, even over a pending delete: what the disk holds", None, False,
     Pending("delete", 150.0, version=3), None, None),
    ("Redis has a newer version: Redis's", live(4), True, None, LOCAL, REMOTE),
    ("Redis has the same number: Redis's record (its digest decides)", live(3), True, None, LOCAL, REMOTE),
    ("only Redis has it: Redis's", live(1), True, None, None, REMOTE),
    ("a local version above Redis's, not yet published: the local one", live(2), True, None, LOCAL, LOCAL),
    ("deleted in Redis after the local version: not found", tombstone(4), True, None, LOCAL, None),
    ("a tombstone below a newer local version: the local one", tombstone(2), True, None, LOCAL, LOCAL),
    ("tombstone, no local copy: not found", tombstone(4), True, None, None, None),
    ("pending put, Redis lost the task: the outage write", None, True, Pending("put", 150.0, "aa"), LOCAL,
     LOCAL),
    ("pending put later than Redis's write: the outage write, whatever the numbers", live(9, at=140.0), True,
     Pending("put", 150.0, "aa"), LOCAL, LOCAL),
    ("pending put at the same time as Redis's write: the outage write", live(9, at=150.0), True,
     Pending("put", 150.0, "aa"), LOCAL, LOCAL),
    ("pending put older than Redis's write: Redis's", live(1, at=160.0), True, Pending("put", 150.0, "aa"),
     LOCAL, REMOTE),
    ("pending put older than a delete in Redis: not found", tombstone(9, at=160.0), True,
     Pending("put", 150.0, "aa"), LOCAL, None),
    ("pending delete, Redis lost the task: not found", None, True, Pending("delete", 150.0, version=3), None,
     None),
    ("pending delete later than Redis's write: not found", live(9, at=140.0), True,
     Pending("delete", 150.0, version=3), None, None),
    ("pending delete older than Redis's write: Redis's", live(9, at=160.0), True,
     Pending("delete", 150.0, version=3), None, REMOTE),
]


@pytest.mark.parametrize(("remote", "reachable", "pending", "local", "expected"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_resolve(remote, reachable, pending, local, expected):
    want = TaskRecord.from_json(remote.meta) if expected == REMOTE else expected
    assert resolve(remote, reachable, pending, local) == want


def test_resolve_does_not_touch_its_inputs():
    remote, pending = live(4), Pending("put", 150.0, "aa")
    meta = dict(remote.meta)
    resolve(remote, True, pending, LOCAL)
    assert remote.meta == meta and pending == Pending("put", 150.0, "aa")


def test_pending_markers_round_trip_the_persisted_format():
    """Markers written by earlier versions (plain dicts without ``version`` or ``sha256``) still read."""
    assert Pending.from_json({"op": "put", "sha256": "aa", "at": 1.5}) == Pending("put", 1.5, "aa")
    assert Pending.from_json({"op": "delete", "version": 7, "at": 2}) == Pending("delete", 2.0, version=7)
    for marker in (Pending("put", 1.5, "aa"), Pending("delete", 2.0, version=7)):
        assert Pending.from_json(marker.as_json()) == marker
    with pytest.raises(ValueError):
        Pending.from_json({"op": "rename", "at": 1.0})


def test_records_persist_the_key_as_task():
    """meta.json and Redis name the key "task", as before the field was renamed."""
    fields = LOCAL.as_json()
    assert fields["task"] == "acme~t" and "key" not in fields
    assert TaskRecord.from_json(fields) == LOCAL
