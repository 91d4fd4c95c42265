"""What the shared Redis tier holds, and the Lua scripts that change it. No connection lives here.

Layout (``P`` is the key prefix, ``prefix-serve`` by default; ``K`` a store key such as ``acme~summary``;
``N`` its namespace, empty for an unqualified key)::

    P:task:K   hash   live:      version, sha256, owner, at (created_at), bytes, meta (TaskRecord JSON),
                                 data (the prefix-serve safetensors file: to_own_format)
                      tombstone: version, deleted=1, at (deletion time)
    P:seq:K    string the last version number handed out for K (versions are allocated here, atomically)
    P:tasks    set    keys of live tasks (what ``list`` shows)
    P:bytes    string bytes of live tasks (the tier's resident bytes)
    P:owned:N  hash   K -> bytes of each live task of namespace N: what a quota is checked against
    P:events   pub/sub channel: {"op": "put"|"delete", "task": K, "version": N, "origin": replica id}

Redis may lose any of it (a restart without persistence, a failover to an empty server, FLUSHALL, eviction):
every replica reconciles its disk with Redis periodically and pushes back the versions and the deletes it
holds (``TOMBSTONE``), each only over an older version, so the newest wins (:mod:`prefixes.store.sync`).

Every write is one Lua script, so Redis applies it atomically: a version is only ever written over an
older one (compare-and-set on ``version``), the set, the byte counts and the event change with it, and a
version number is never reused (the sequence is bumped past every version written, including ones pushed
back by a replica after Redis lost its data). A delete leaves a tombstone with a version above every
earlier one, so a replica's old local copy can never look newer than the delete. A put under a quota
checks the namespace's ``owned`` hash in the same script, so replicas racing uploads cannot together
exceed it. (``owned`` is kept since quotas moved here: tasks written by an earlier release are added to it
by ``BACKFILL_OWNED`` when a replica (re)connects.)

Redis out of memory (``maxmemory``, ``noeviction``): a script without flags is refused at its first write
command that may grow memory, and never once it has written, so each script is refused whole or runs whole.
ALLOCATE's first write is a SET: an upload is refused before anything changed. DELETE's first write is the
DEL, so a delete, which frees memory, still works.

Nothing here is unpickled: values are JSON, integers and safetensors bytes.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from prefixes.keys import split_key

log = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "prefix-serve"
FIELDS = ("version", "sha256", "deleted", "at", "meta")


@dataclass(frozen=True, slots=True)
class RemoteState:
    """What Redis holds for one key: a live version (with its record) or a tombstone."""

    version: int
    deleted: bool
    at: float  # created_at of a live version, deletion time of a tombstone
    sha256: str | None = None
    meta: dict[str, Any] | None = None  # the TaskRecord's persisted fields of a live version


@dataclass(frozen=True, slots=True)
class Layout:
    """The Redis key names under one key prefix."""

    prefix: str = DEFAULT_KEY_PREFIX

    def task(self, key: str) -> str:
        return f"{self.prefix}:task:{key}"

    def seq(self, key: str) -> str:
        return f"{self.prefix}:seq:{key}"

    def owned(self, key: str) -> str:
        return f"{self.prefix}:owned:{split_key(key)[0] or ''}"

    @property
    def tasks(self) -> str:
        return f"{self.prefix}:tasks"

    @property
    def bytes(self) -> str:
        return f"{self.prefix}:bytes"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:events"

    def writes(self, key: str) -> list[str]:
        """The KEYS of PUBLISH and DELETE."""
        return [self.task(key), self.seq(key), self.tasks, self.bytes, self.owned(key)]


# KEYS: seq, task hash.  ARGV: floor.  A version above the sequence, the stored version and ``floor``.
ALLOCATE = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local stored = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
local n = math.max(seq, stored, tonumber(ARGV[1])) + 1
redis.call('SET', KEYS[1], n)
return n
"""

# KEYS: Layout.writes.  ARGV: key, version, sha256, owner, meta, data, at, bytes, channel, origin,
# max_tasks, max_bytes (either '' for no limit).
# Writes the version only over an older one. Returns {1} when written, {0} when Redis already has it or
# newer, {-1, other tasks, their bytes} when the namespace's quota refuses it.
PUBLISH = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local v = tonumber(ARGV[2])
if stored >= v then return {0} end
if ARGV[11] ~= '' or ARGV[12] ~= '' then
  local others, used = 0, 0
  local owned = redis.call('HGETALL', KEYS[5])
  for i = 1, #owned, 2 do
    if owned[i] ~= ARGV[1] then
      others = others + 1
      used = used + tonumber(owned[i + 1])
    end
  end
  if (ARGV[11] ~= '' and others + 1 > tonumber(ARGV[11]))
      or (ARGV[12] ~= '' and used + tonumber(ARGV[8]) > tonumber(ARGV[12])) then
    return {-1, others, used}
  end
end
local old = 0
if stored > 0 and not redis.call('HGET', KEYS[1], 'deleted') then
  old = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', v, 'sha256', ARGV[3], 'owner', ARGV[4], 'meta', ARGV[5],
           'data', ARGV[6], 'at', ARGV[7], 'bytes', ARGV[8])
if tonumber(redis.call('GET', KEYS[2]) or '0') < v then redis.call('SET', KEYS[2], v) end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('INCRBY', KEYS[4], tonumber(ARGV[8]) - old)
redis.call('HSET', KEYS[5], ARGV[1], ARGV[8])
redis.call('PUBLISH', ARGV[9], cjson.encode({op='put', task=ARGV[1], version=v, origin=ARGV[10]}))
return {1}
"""

# KEYS: Layout.writes.  ARGV: key, floor, force, at, channel, origin.
# Replaces the task by a tombstone with a fresh version; returns it, or -1 when there was no live task and
# not ``force`` (the caller's local copy is what is being deleted). DEL is the first write (see above).
DELETE = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local live = stored > 0 and not redis.call('HGET', KEYS[1], 'deleted')
if not live and ARGV[3] == '0' then return -1 end
local old = 0
if live then old = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0') end
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local n = math.max(seq, stored, tonumber(ARGV[2])) + 1
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], n)
redis.call('HSET', KEYS[1], 'version', n, 'deleted', '1', 'at', ARGV[4])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('DECRBY', KEYS[4], old)
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('PUBLISH', ARGV[5], cjson.encode({op='delete', task=ARGV[1], version=n, origin=ARGV[6]}))
return n
"""

# KEYS: Layout.writes.  ARGV: key, version, at, channel, origin.
# A delete pushed back from a replica's disk after Redis lost it: a tombstone of exactly ``version``, only
# over an older version (a live version written since, with a higher number, stays). 1 when written.
TOMBSTONE = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local v = tonumber(ARGV[2])
if stored >= v then return 0 end
local old = 0
if stored > 0 and not redis.call('HGET', KEYS[1], 'deleted') then
  old = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', v, 'deleted', '1', 'at', ARGV[3])
if tonumber(redis.call('GET', KEYS[2]) or '0') < v then redis.call('SET', KEYS[2], v) end
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('DECRBY', KEYS[4], old)
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('PUBLISH', ARGV[4], cjson.encode({op='delete', task=ARGV[1], version=v, origin=ARGV[5]}))
return 1
"""


# KEYS: the live-task set.  ARGV: the key prefix.
# Adds every live task missing from its namespace's ``owned`` hash (written by a release before quotas moved
# into Redis); returns how many. It reads and writes keys it derives from the set's members, which a
# standalone Redis allows (a cluster would not: the store's keys are not hash-tagged anyway).
BACKFILL_OWNED = """
local added = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local ns = string.match(key, '^(.*)~[^~]*$') or ''
  local bytes = redis.call('HGET', ARGV[1] .. ':task:' .. key, 'bytes')
  if bytes then
    added = added + redis.call('HSETNX', ARGV[1] .. ':owned:' .. ns, key, bytes)
  end
end
return added
"""


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def parse_state(values: list[Any]) -> RemoteState | None:
    """A RemoteState from ``HMGET FIELDS`` (plus anything after), None when the key does not exist."""
    version, sha256, deleted, at, meta = values[:5]
    if version is None:
        return None
    try:
        state = RemoteState(version=int(version), deleted=deleted is not None, at=float(at or 0.0),
                            sha256=_text(sha256), meta=None if meta is None else json.loads(meta))
        if not state.deleted and not isinstance(state.meta, dict):
            raise ValueError("a live entry without its record")
    except ValueError as exc:  # not written by this code: ignored, as if Redis did not have it
        log.error("ignoring a malformed Redis entry (version %r): %s", version, exc)
        return None
    return state
