"""PrefixStore: the durable on-disk task store and its byte-budgeted in-memory LRU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import prefixes.store.disk as disk_module
from prefixes.artifact import PrefixArtifact, PrefixKind
from prefixes.keys import InvalidTaskName, check_task_name
from prefixes.records import TaskRecord
from prefixes.store import PrefixStore, StorageFull, TaskNotFound

REPO = Path(__file__).resolve().parents[2]
ROW_BYTES = 64 * 4  # one float32 virtual token of a hidden-size-64 soft prompt


def soft(rows: int = 4, value: float | None = None, seed: int = 0, dtype=torch.float32) -> PrefixArtifact:
    """A P-Tuning soft prompt of ``rows`` virtual tokens (rows * 256 bytes in float32)."""
    if value is None:
        torch.manual_seed(seed)
        tensor = torch.randn(rows, 64)
    else:
        tensor = torch.full((rows, 64), float(value))
    return PrefixArtifact(PrefixKind.P_TUNING, tensor.to(dtype), "peft", {"peft_type": "P_TUNING"})


def deep(p: int = 3, seed: int = 0, dtype=torch.float32) -> PrefixArtifact:
    torch.manual_seed(seed)
    return PrefixArtifact(PrefixKind.PREFIX_TUNING, torch.randn(2, 2, 2, p, 16).to(dtype), "chatglm",
                          {"prefix_projection": "True"})


def open_store(root: Path, cache_bytes: int = 1 << 20, prepare=lambda t: t) -> PrefixStore:
    return PrefixStore(root, cache_bytes=cache_bytes, prepare=prepare)


def version_dirs(root: Path, task: str) -> list[str]:
    return sorted(p.name for p in (root / "tasks" / task).iterdir() if p.is_dir())


# ---------------------------------------------------------------------------------------------------------
# CRUD, versions, digests


def test_put_info_list_get_delete(tmp_path):
    store = open_store(tmp_path)
    assert store.list() == []
    artifact = soft(4, seed=1)
    before = time.time()

    record = store.put("sentiment", artifact)

    assert isinstance(record, TaskRecord)
    assert record.key == "sentiment"
    assert record.kind == "p_tuning"
    assert record.num_virtual_tokens == 4
    assert record.version == 1
    assert record.bytes == 4 * ROW_BYTES
    assert record.sha256 == artifact.sha256()
    assert record.source_format == "peft"
    assert before <= record.created_at <= time.time()
    assert record.as_json()["sha256"] == artifact.sha256()

    # on disk, as documented
    task_dir = tmp_path / "tasks" / "sentiment"
    assert (task_dir / "CURRENT").read_text() == "1"
    assert sorted(p.name for p in (task_dir / "v1").iterdir()) == ["meta.json", "prefix.safetensors"]

    assert store.info("sentiment") == record
    store.put("another", deep())
    assert [r.key for r in store.list()] == ["another", "sentiment"]
    assert store.list()[1] == record

    resident = store.get("sentiment")
    assert resident.record == record
    assert resident.kind is PrefixKind.P_TUNING
    assert resident.num_virtual_tokens == 4
    assert torch.equal(resident.tensor, artifact.tensor)

    store.delete("sentiment")
    assert not task_dir.exists()
    assert [r.key for r in store.list()] == ["another"]
    with pytest.raises(TaskNotFound):
        store.info("sentiment")
    with pytest.raises(TaskNotFound):
        store.get("sentiment")
    with pytest.raises(TaskNotFound):
        store.delete("sentiment")
    assert list((tmp_path / "trash").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_reupload_increments_version_and_removes_old(tmp_path):
    store = open_store(tmp_path)
    first = store.put("t", soft(value=1.0))
    second = store.put("t", soft(value=2.0))
    third = store.put("t", soft(rows=6, value=3.0))

    assert (first.version, second.version, third.version) == (1, 2, 3)
    assert version_dirs(tmp_path, "t") == ["v3"]
    assert (tmp_path / "tasks" / "t" / "CURRENT").read_text() == "3"
    assert store.info("t") == third
    assert third.num_virtual_tokens == 6
    assert torch.equal(store.get("t").tensor, torch.full((6, 64), 3.0))
    assert [r.version for r in store.list()] == [3]


def test_sha256_stable_for_equal_tensors(tmp_path):
    store = open_store(tmp_path)
    artifact = soft(seed=5)
    a = store.put("a", artifact)
    b = store.put("b", PrefixArtifact(artifact.kind, artifact.tensor.clone(), "prefix-serve"))
    a2 = store.put("a", artifact)
    different = store.put("c", soft(seed=6))
    as_half = store.put("d", PrefixArtifact(artifact.kind, artifact.tensor.half(), "peft"))

    assert a.sha256 == b.sha256 == a2.sha256 == artifact.sha256()
    assert a2.version == 2
    assert different.sha256 != a.sha256
    assert as_half.sha256 != a.sha256  # dtype is part of what is served
    # the digest of what comes back from disk is the recorded one
    reopened = open_store(tmp_path)
    for task in ("a", "b", "c", "d"):
        resident = reopened.get(task)
        assert PrefixArtifact(resident.kind, resident.tensor, "x").sha256() == reopened.info(task).sha256


# ---------------------------------------------------------------------------------------------------------
# Durability and atomicity


def test_new_store_over_same_dir_serves_identical_tensors(tmp_path):
    store = open_store(tmp_path)
    artifacts = {"deep32": deep(seed=1), "deep-bf16": deep(p=5, seed=2, dtype=torch.bfloat16),
                 "soft16": soft(7, seed=3, dtype=torch.float16)}
    records = {task: store.put(task, art) for task, art in artifacts.items()}
    store.put("deep32", artifacts["deep32"])  # a second version, so the reopen must follow CURRENT
    records["deep32"] = store.info("deep32")
    del store

    reopened = open_store(tmp_path)
    assert {r.key: r for r in reopened.list()} == records
    for task, art in artifacts.items():
        resident = reopened.get(task)
        assert resident.kind is art.kind
        assert resident.tensor.dtype == art.tensor.dtype
        assert torch.equal(resident.tensor, art.tensor)
        assert resident.record == records[task]
    assert reopened.put("deep32", deep(seed=9)).version == 3


@pytest.mark.parametrize("fail_at", ["rename", "replace"])
def test_failed_write_keeps_previous_version(tmp_path, monkeypatch, fail_at):
    """An error inside put (after the staging files are written) leaves version 1 served, intact."""
    store = open_store(tmp_path)
    old = soft(value=1.0)
    old_record = store.put("t", old)
    assert torch.equal(store.get("t").tensor, old.tensor)  # resident in this instance

    real = getattr(os, fail_at)
    staged = []

    def failing(src, dst, *args, **kwargs):
        src = Path(src)
        staged.append(sorted(p.name for p in src.iterdir()) if src.is_dir() else src.read_text())
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(disk_module.os, fail_at, failing)
    with pytest.raises(StorageFull, match=r"disk\) is full"):  # ENOSPC is a domain error (507 over HTTP)
        store.put("t", soft(value=2.0))
    monkeypatch.setattr(disk_module.os, fail_at, real)
    # the failure hit after the new data was staged: the complete version dir, or the new pointer
    expected = [["CURRENT.next", "meta.json", "prefix.safetensors"]] if fail_at == "rename" else ["2"]
    assert staged == expected

    assert store.info("t") == old_record
    assert torch.equal(store.get("t").tensor, old.tensor)
    reopened = open_store(tmp_path)
    assert reopened.info("t") == old_record
    assert torch.equal(reopened.get("t").tensor, old.tensor)
    assert list((tmp_path / "tmp").iterdir()) == []

    # and the store still takes new versions afterwards, leaving one version directory
    new = reopened.put("t", soft(value=3.0))
    assert new.version > old_record.version
    assert version_dirs(tmp_path, "t") == [f"v{new.version}"]
    assert torch.equal(reopened.get("t").tensor, torch.full((4, 64), 3.0))


def test_failed_first_write_leaves_no_task(tmp_path, monkeypatch):
    store = open_store(tmp_path)

    def failing(*args, **kwargs):
        raise OSError("simulated")

    monkeypatch.setattr(disk_module.os, "replace", failing)
    with pytest.raises(OSError):
        store.put("t", soft())
    monkeypatch.undo()
    for s in (store, open_store(tmp_path)):
        assert s.list() == []
        with pytest.raises(TaskNotFound):
            s.info("t")
        with pytest.raises(TaskNotFound):
            s.get("t")


# A separate process that dies (os._exit: no finally blocks, no cleanup) at one point of a write or delete.
CRASH_SCRIPT = r"""
import os, shutil, sys
from pathlib import Path
import torch
import prefixes.store as store_module
from prefixes.artifact import PrefixArtifact, PrefixKind

root, point = Path(sys.argv[1]), sys.argv[2]
store = store_module.PrefixStore(root, 1 << 20, prepare=lambda t: t)

def die(*args, **kwargs):
    os._exit(77)

if point == "delete":
    shutil.rmtree = die  # after the task dir was renamed into trash/
    store.delete("t")
else:
    setattr(os, point, die)  # "rename": version dir staged in tmp/; "replace": renamed, CURRENT not yet
    store.put("t", PrefixArtifact(PrefixKind.P_TUNING, torch.full((4, 64), 2.0), "peft"))
sys.exit(0)
"""


def crash(root: Path, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(root), point], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 77, f"the writer did not crash where planned: {proc.returncode} {proc.stderr}"


@pytest.mark.parametrize("point", ["rename", "replace"])
def test_crash_mid_put_keeps_previous_version_and_sweeps_staging(tmp_path, point):
    old = soft(value=1.0)
    old_record = open_store(tmp_path).put("t", old)

    crash(tmp_path, point)

    staging = list((tmp_path / "tmp").iterdir())
    if point == "rename":  # the new version was fully written in staging when the process died
        assert len(staging) == 1
        staged = sorted(p.name for p in staging[0].iterdir())
        assert staged == ["CURRENT.next", "meta.json", "prefix.safetensors"]

    reopened = open_store(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list((tmp_path / "trash").iterdir()) == []
    assert reopened.info("t") == old_record
    assert [r.key for r in reopened.list()] == ["t"]
    resident = reopened.get("t")
    assert resident.record == old_record
    assert torch.equal(resident.tensor, old.tensor)
    # still writable: the next version supersedes everything before it
    record = reopened.put("t", soft(value=5.0))
    assert version_dirs(tmp_path, "t") == [f"v{record.version}"]
    assert torch.equal(open_store(tmp_path).get("t").tensor, torch.full((4, 64), 5.0))


def test_crash_mid_delete_is_a_completed_delete_and_trash_is_swept(tmp_path):
    store = open_store(tmp_path)
    store.put("t", soft())
    store.put("keep", soft(value=4.0))

    crash(tmp_path, "delete")

    assert len(list((tmp_path / "trash").iterdir())) == 1  # what the dead process left
    reopened = open_store(tmp_path)
    assert list((tmp_path / "trash").iterdir()) == []
    with pytest.raises(TaskNotFound):
        reopened.info("t")
    assert [r.key for r in reopened.list()] == ["keep"]
    assert torch.equal(reopened.get("keep").tensor, torch.full((4, 64), 4.0))


def test_crash_between_rename_and_replace_leaves_nothing_after_reopen(tmp_path):
    open_store(tmp_path).put("t", soft(value=1.0))
    crash(tmp_path, "replace")
    open_store(tmp_path)
    assert sorted(p.name for p in (tmp_path / "tasks" / "t").iterdir()) == ["CURRENT", "v1"]


@pytest.mark.parametrize("racer", ["put", "delete"])
def test_get_racing_a_reupload_or_delete(tmp_path, monkeypatch, racer):
    store = open_store(tmp_path)
    store.put("t", soft(value=1.0))
    real_info = store.disk.info

    def info_then_other_thread_writes(key):
        record = real_info(key)
        # The interleaving a concurrent request can produce: it writes right after get() read the record.
        monkeypatch.setattr(store.disk, "info", real_info)
        if racer == "put":
            store.put("t", soft(value=2.0))
        else:
            store.delete("t")
        return record

    monkeypatch.setattr(store.disk, "info", info_then_other_thread_writes)
    if racer == "put":
        resident = store.get("t")
        assert resident.tensor[0, 0].item() in (1.0, 2.0)
        assert torch.equal(store.get("t").tensor, torch.full((4, 64), 2.0))
    else:
        with pytest.raises(TaskNotFound):
            store.get("t")


# ---------------------------------------------------------------------------------------------------------
# Memory tier (LRU by bytes)


def stats_tuple(store: PrefixStore) -> tuple[int, int, int, int, int]:
    s = store.stats
    return s.hits, s.misses, s.evictions, s.resident_bytes, s.resident_tasks


def test_lru_respects_byte_budget_and_evicts_least_recently_used(tmp_path):
    kb = 4 * ROW_BYTES  # each task below is 1024 bytes
    store = open_store(tmp_path, cache_bytes=3 * kb)
    tensors = {}
    for i, task in enumerate("abcd"):
        store.put(task, soft(4, value=i + 1))
        tensors[task] = torch.full((4, 64), float(i + 1))

    def get(task):
        resident = store.get(task)
        assert torch.equal(resident.tensor, tensors[task])
        assert store.stats.resident_bytes <= store.cache_bytes
        return resident

    first_a = get("a")
    get("b")
    get("c")
    assert stats_tuple(store) == (0, 3, 0, 3 * kb, 3)
    assert get("a") is first_a  # a hit serves the resident object itself
    assert stats_tuple(store) == (1, 3, 0, 3 * kb, 3)   # order now b, c, a
    get("d")                                              # evicts b, the least recently used
    assert stats_tuple(store) == (1, 4, 1, 3 * kb, 3)   # c, a, d
    get("a")
    get("c")
    assert stats_tuple(store) == (3, 4, 1, 3 * kb, 3)   # d, a, c: both were still resident
    get("b")                                              # miss: it was evicted; evicts d
    assert stats_tuple(store) == (3, 5, 2, 3 * kb, 3)   # a, c, b
    get("c")
    get("a")
    assert stats_tuple(store) == (5, 5, 2, 3 * kb, 3)   # b, c, a
    get("d")                                              # evicts b
    assert stats_tuple(store) == (5, 6, 3, 3 * kb, 3)
    get("b")                                              # evicts c
    assert stats_tuple(store) == (5, 7, 4, 3 * kb, 3)   # a, d, b
    get("a")
    assert stats_tuple(store) == (6, 7, 4, 3 * kb, 3)
    assert store.stats.load_seconds_total > 0


def test_lru_evicts_as_many_as_needed_for_a_bigger_task(tmp_path):
    store = open_store(tmp_path, cache_bytes=4 * ROW_BYTES * 3)
    for task in "abc":
        store.put(task, soft(4, seed=ord(task)))
        store.get(task)
    store.put("big", soft(8, seed=1))  # 2048 bytes: a and b must both go
    store.get("big")
    assert stats_tuple(store) == (0, 4, 2, 3 * 4 * ROW_BYTES, 2)
    store.get("c")
    assert store.stats.hits == 1
    store.get("a")
    assert store.stats.misses == 5


def test_artifact_larger_than_budget_is_served_but_not_kept(tmp_path):
    store = open_store(tmp_path, cache_bytes=3 * 4 * ROW_BYTES)
    store.put("small", soft(4, value=1.0))
    store.put("huge", soft(16, value=7.0))  # 4096 bytes > 3072 budget
    small = store.get("small")

    for _ in range(2):
        huge = store.get("huge")
        assert torch.equal(huge.tensor, torch.full((16, 64), 7.0))
        assert huge.record.num_virtual_tokens == 16
    assert stats_tuple(store) == (0, 3, 0, 4 * ROW_BYTES, 1)  # both huge gets missed; nothing evicted
    assert store.get("small") is small
    assert store.stats.hits == 1


def test_budget_counts_prepared_tensor_bytes_and_prepare_runs_once_per_load(tmp_path):
    calls = []

    def prepare(t: torch.Tensor) -> torch.Tensor:  # the serving dtype is half: resident copies are half size
        calls.append(tuple(t.shape))
        return t.to(torch.float16)

    store = open_store(tmp_path, cache_bytes=2 * 4 * 64 * 2, prepare=prepare)  # room for two half tasks
    for task in "ab":
        store.put(task, soft(4, seed=ord(task)))
    a = store.get("a")
    b = store.get("b")
    assert a.tensor.dtype == torch.float16
    assert torch.equal(a.tensor, soft(4, seed=ord("a")).tensor.half())
    assert stats_tuple(store) == (0, 2, 0, 2 * 4 * 64 * 2, 2)  # float32 would only have fitted one
    assert store.get("a") is a and store.get("b") is b
    assert calls == [(4, 64), (4, 64)]


def test_put_and_delete_invalidate_the_resident_copy(tmp_path):
    kb = 4 * ROW_BYTES
    store = open_store(tmp_path, cache_bytes=4 * kb)
    store.put("t", soft(4, value=1.0))
    store.put("other", soft(4, value=9.0))
    store.get("other")
    assert torch.equal(store.get("t").tensor, torch.full((4, 64), 1.0))
    assert stats_tuple(store) == (0, 2, 0, 2 * kb, 2)

    store.put("t", soft(4, value=2.0))
    assert stats_tuple(store)[3:] == (kb, 1)  # the old copy is gone from memory
    resident = store.get("t")
    assert torch.equal(resident.tensor, torch.full((4, 64), 2.0))
    assert resident.record.version == 2
    assert store.stats.misses == 3
    assert torch.equal(store.get("t").tensor, torch.full((4, 64), 2.0))  # and the new one is cached
    assert store.stats.hits == 1

    store.delete("t")
    assert stats_tuple(store)[3:] == (kb, 1)
    with pytest.raises(TaskNotFound):
        store.get("t")
    assert torch.equal(store.get("other").tensor, torch.full((4, 64), 9.0))

    # a new upload under the deleted name is served, not a stale copy
    store.put("t", soft(4, value=3.0))
    assert torch.equal(store.get("t").tensor, torch.full((4, 64), 3.0))


# ---------------------------------------------------------------------------------------------------------
# Task names


INVALID_NAMES = ["../x", "..", ".", "", "a/b", "/abs", "a\\b", ".hidden", "-x", "a b", "t\x00", "é",
                 "a" * 129]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_task_names_are_refused_by_put_and_delete(tmp_path, name):
    root = tmp_path / "store"
    store = open_store(root)
    for call in (lambda: check_task_name(name), lambda: store.put(name, soft()), lambda: store.delete(name)):
        with pytest.raises(InvalidTaskName, match="is invalid: use 1-128 characters"):
            call()
    # whatever info/get raise for such a name, it never reaches outside the store or creates anything
    for call in (lambda: store.info(name), lambda: store.get(name)):
        with pytest.raises((InvalidTaskName, TaskNotFound)):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert list((root / "tasks").iterdir()) == []


@pytest.mark.parametrize("method", ["info", "get"])
@pytest.mark.parametrize("name", ["../x", "", "a/b"])
def test_invalid_task_names_are_refused_by_info_and_get(tmp_path, method, name):
    store = open_store(tmp_path)
    with pytest.raises(InvalidTaskName, match="is invalid"):
        getattr(store, method)(name)


@pytest.mark.parametrize("name", ["a", "A9", "task-1.v2_x", "7", "a" * 128])
def test_valid_task_names(tmp_path, name):
    store = open_store(tmp_path)
    assert check_task_name(name) == name
    assert store.put(name, soft()).key == name
    assert store.info(name).key == name


def test_task_name_with_trailing_newline_refused(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(InvalidTaskName):
        store.put("abc\n", soft())


def test_unknown_task_raises_task_not_found(tmp_path):
    store = open_store(tmp_path)
    store.put("known", soft())
    for call in (lambda: store.info("unknown"), lambda: store.get("unknown"),
                 lambda: store.delete("unknown")):
        with pytest.raises(TaskNotFound) as exc:
            call()
        assert isinstance(exc.value, KeyError)
    assert [r.key for r in store.list()] == ["known"]
