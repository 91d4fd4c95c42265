"""Key/value memory by the block, the accounting: which blocks each sequence, task and cached prompt holds.

The pool (:class:`~server.engine.kv_cache.PagedKVCache`) has ``num_blocks`` fixed-size blocks of
``block_size`` token slots. A sequence owns a *block table* (its blocks, in order), and its token ``i`` (soft
prompt, prompt, then generated tokens) lives at slot ``table[i // B] * B + i % B``.

Three kinds of block, all from the same pool and all reference-counted:

- a sequence's own blocks, taken as its tokens are scheduled and returned when it leaves;
- a prefix-tuning task's per-layer prefix key/values (``[L, 2, Hkv, P, D]``), written once into blocks owned
  by that task version and shared by every running request of the task (no copy per request); an unused
  task's blocks are evicted least recently used first;
- prompt blocks kept for reuse (automatic prefix caching): a full block of computed tokens is registered
  under a hash of its tokens and of every block before it, rooted at (tenant, task version); a later request
  whose chain of blocks is identical takes the same blocks instead of computing them. A task's prefix changes
  every layer's keys/values, so the root keeps tasks (and their versions) apart, and tenants apart unless the
  operator shares the cache. Unreferenced cached blocks are evicted least recently used first.

:class:`BlockManager` keeps host-side lists only (the scheduler asks it what fits); no tensor is touched here.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from server.engine.sequence import Sequence

# Measured on the 2-core development CPU (docs/design.md, "The paged key/value cache"; the script and its
# output in server/bench/results/kv/block_size.py): attention gathers slots, not blocks,
# so decode speed does not depend on the block size; a small block wastes less memory per request (half a
# block on average) and lets more of a shared preamble be reused (only full blocks are cached).
DEFAULT_BLOCK_SIZE = 16


class _BlockPool:
    """Block ids with reference counts; freed blocks that hold a cached prompt block stay findable by hash
    until evicted (least recently freed first)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._free: list[int] = list(reversed(range(num_blocks)))  # never-cached free blocks (a stack)
        self._hash_of: dict[int, bytes] = {}  # block -> hash, for registered (cached) blocks
        self._by_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with no reference, LRU first

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.refs[block] == 0:
            self._evictable.pop(block)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        assert self.refs[block] >= 0, f"block {block} released more often than taken"
        if self.refs[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def lookup(self, key: bytes) -> int | None:
        return self._by_hash.get(key)

    def register(self, block: int, key: bytes) -> None:
        """Make ``block`` (full, computed) findable under ``key``; the first block of a content wins."""
        if key not in self._by_hash and block not in self._hash_of:
            self._by_hash[key] = block
            self._hash_of[block] = key

    def forget(self, block: int) -> None:
        """Stop offering ``block`` as a cached block (its contents are not trusted)."""
        key = self._hash_of.pop(block, None)
        if key is not None:
            del self._by_hash[key]
            if self.refs[block] == 0:
                self._evictable.pop(block)
                self._free.append(block)

    def forget_all(self) -> None:
        for block in list(self._hash_of):
            self.forget(block)


@dataclass(eq=False, slots=True)
class TaskBlocks:
    """A task version's place in the cache: its prefix key/values (prefix-tuning; none for soft prompts) and
    the root of its requests' cached prompt blocks."""

    tensor: weakref.ref[torch.Tensor]  # the task version's tensor; the entry goes when the tensor does
    uid: int  # never reused: cached prompt blocks are keyed by it
    num_prefix: int  # P: prefix key/value positions (0 for soft prompts)
    blocks: list[int] = field(default_factory=list)
    users: int = 0  # running sequences of this task


@dataclass(eq=False, slots=True)
class BlockTable:
    """One sequence's blocks: ``blocks[k]`` holds its tokens ``[k * B, (k + 1) * B)``."""

    root: bytes  # hash root: tenant salt and task version
    task: TaskBlocks | None
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its full, registered blocks
    num_cached: int = 0  # tokens it took from the prefix cache when it joined


class BlockManager:
    """What the scheduler asks before it schedules tokens: how many blocks a sequence needs, whether they
    are free, and which of its prompt blocks are already cached. Knows ids and counts, never tensors."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True,
                 share_across_tenants: bool = False, model_id: str = ""):
        if num_blocks < 1:
            raise ValueError("the key/value budget holds no block; raise --kv-cache-bytes")
        self.block_size = block_size
        self.pool = _BlockPool(num_blocks)
        self.prefix_caching = prefix_caching
        self.share_across_tenants = share_across_tenants
        self.model_id = model_id
        self.tables: dict[int, BlockTable] = {}  # by sequence id
        self.tasks: OrderedDict[int, TaskBlocks] = OrderedDict()  # id(prefix tensor) -> entry, LRU first
        self.pending_prefix_writes: list[TaskBlocks] = []  # new task entries the cache must fill in
        self._uids = itertools.count()
        # vLLM's prefix-cache counters, in tokens: looked up, and found
        self.cache_queries = 0
        self.cache_hits = 0
        self.preemptions = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free(self) -> int:
        """Blocks a request could get now: free, cached-but-unreferenced, or held by an unused task."""
        idle_tasks = sum(len(t.blocks) for t in self.tasks.values() if not t.users)
        return self.pool.num_free + idle_tasks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by running requests or resident tasks (vLLM's kv_cache_usage)."""
        return 1.0 - self.pool.num_free / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- tasks ----------------------------------------------------------------------------------------------

    def _task(self, seq: Sequence) -> TaskBlocks | None:
        if seq.prefix is None:
            return None
        tensor = seq.prefix.tensor
        entry = self.tasks.get(id(tensor))
        if entry is not None and entry.tensor() is tensor:
            self.tasks.move_to_end(id(tensor))
            return entry
        key = id(tensor)
        # The engine drops a task's tensor when the task is deleted or replaced (no running request holds it
        # then): its blocks go back at once, and its uid, hence its cached prompt blocks, is never seen again.
        entry = TaskBlocks(weakref.ref(tensor, lambda _: self._drop_task(key)), next(self._uids),
                           seq.num_prefix_kv)
        self.tasks[key] = entry
        return entry

    def _drop_task(self, key: int) -> None:
        entry = self.tasks.get(key)
        if entry is not None and entry.tensor() is None:
            for block in entry.blocks:
                self.pool.release(block)
            del self.tasks[key]

    def _task_blocks_needed(self, seq: Sequence) -> int:
        if not seq.num_prefix_kv:
            return 0
        assert seq.prefix is not None, "prefix key/values come from a prefix"
        entry = self.tasks.get(id(seq.prefix.tensor))
        if entry is None or entry.tensor() is not seq.prefix.tensor or not entry.blocks:
            return self.blocks_for(seq.num_prefix_kv)
        return 0 if entry.users else len(entry.blocks)  # an idle task's blocks count as free until used

    def _evict_idle_task(self, keep: TaskBlocks | None = None) -> bool:
        for key, entry in self.tasks.items():
            if not entry.users and entry.blocks and entry is not keep:
                for block in entry.blocks:
                    self.pool.release(block)
                entry.blocks = []
                del self.tasks[key]
                return True
        return False

    def _take(self, keep: TaskBlocks | None = None) -> int:
        while not self.pool.num_free:
            if not self._evict_idle_task(keep):
                raise MemoryError("no free key/value block (the scheduler checks before it takes)")
        return self.pool.take()

    # -- sequences ------------------------------------------------------------------------------------------

    def _root(self, seq: Sequence, task: TaskBlocks | None) -> bytes:
        tenant = "" if self.share_across_tenants else seq.tenant
        uid = -1 if task is None else task.uid
        return hashlib.blake2b(f"{self.model_id}\0{tenant}\0{uid}".encode(), digest_size=16).digest()

    def _chain(self, parent: bytes, tokens: list[int]) -> bytes:
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", tokens).tobytes())
        return h.digest()

    def cacheable(self, seq: Sequence) -> bool:
        # Prompt log-probabilities come from computing the prompt; a hit would skip it.
        return self.prefix_caching and seq.params.prompt_logprobs is None

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of ``seq``'s first tokens already in the cache (at least its last token stays to compute:
        its logits give the next token)."""
        if not self.cacheable(seq) or seq.num_computed:
            return []
        task = self.tasks.get(id(seq.prefix.tensor)) if seq.prefix is not None else None
        if seq.prefix is not None and (task is None or task.tensor() is not seq.prefix.tensor):
            return []  # a task new to the cache has no cached blocks yet
        parent, found = self._root(seq, task), []
        tokens = seq.all_tokens()
        for k in range((len(tokens) - 1) // self.block_size):
            parent = self._chain(parent, tokens[k * self.block_size: (k + 1) * self.block_size])
            block = self.pool.lookup(parent)
            if block is None:
                break
            found.append(block)
        return found

    def blocks_to_join(self, seq: Sequence, tokens: int, cached: list[int]) -> int:
        """Blocks ``seq`` must take to join with its first ``tokens`` tokens scheduled (after a cache hit of
        ``cached`` blocks): its own new blocks and, for a task not resident, the task's prefix blocks.
        Cached blocks nobody holds are counted as free, so taking them costs a free block each."""
        own = self.blocks_for(tokens)  # cached blocks are full, so its new tokens start a block
        reclaimed = sum(1 for b in cached if self.pool.refs[b] == 0)
        return own + reclaimed + self._task_blocks_needed(seq)

    def join(self, seq: Sequence, cached: list[int]) -> None:
        """Give ``seq`` its block table (sharing its task's prefix and the ``cached`` blocks)."""
        for block in cached:  # first: taking the task's blocks below may evict unreferenced cached blocks
            self.pool.share(block)
        task = self._task(seq)
        if task is not None:
            if task.num_prefix and not task.blocks:
                task.blocks = [self._take(keep=task) for _ in range(self.blocks_for(task.num_prefix))]
                self.pending_prefix_writes.append(task)
            task.users += 1
        table = BlockTable(self._root(seq, task), task)
        table.blocks = list(cached)
        parent = table.root
        tokens = seq.all_tokens()
        for k in range(len(cached)):
            parent = self._chain(parent, tokens[k * self.block_size: (k + 1) * self.block_size])
            table.hashes.append(parent)
        table.num_cached = len(cached) * self.block_size
        if self.cacheable(seq):
            self.cache_queries += seq.num_tokens
            self.cache_hits += table.num_cached
        self.tables[seq.id] = table
        seq.num_computed = table.num_cached
        seq.num_cached_tokens = max(seq.num_cached_tokens, table.num_cached)

    def new_blocks(self, seq: Sequence, tokens: int) -> int:
        """Blocks ``seq`` must take for ``tokens`` more tokens beyond those it computed."""
        table = self.tables[seq.id]
        return max(0, self.blocks_for(seq.num_computed + tokens) - len(table.blocks))

    def grow(self, seq: Sequence, tokens: int) -> None:
        table = self.tables[seq.id]
        for _ in range(self.new_blocks(seq, tokens)):
            table.blocks.append(self._take())

    def computed(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that are now full of computed tokens as cached prompt blocks."""
        table = self.tables[seq.id]
        if not self.cacheable(seq):
            return
        full = seq.num_computed // self.block_size
        if len(table.hashes) >= full:
            return
        tokens = seq.all_tokens()
        parent = table.hashes[-1] if table.hashes else table.root
        for k in range(len(table.hashes), full):
            parent = self._chain(parent, tokens[k * self.block_size: (k + 1) * self.block_size])
            table.hashes.append(parent)
            self.pool.register(table.blocks[k], parent)

    def leave(self, seq: Sequence, trusted: bool = True) -> None:
        """Return ``seq``'s blocks; its cached blocks stay findable unless their contents are not
        ``trusted`` (a row that produced non-finite values)."""
        table = self.tables.pop(seq.id, None)
        if table is None:
            return
        for block in table.blocks:
            if not trusted:
                self.pool.forget(block)
            self.pool.release(block)
        if table.task is not None:
            table.task.users -= 1

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks so others can go on; it is recomputed from its tokens when it rejoins."""
        self.leave(seq)
        seq.num_computed = 0
        self.preemptions += 1

    def reset(self) -> None:
        """After a failed forward no block's contents are trusted: drop every table, task and cached block."""
        for seq_id in list(self.tables):
            table = self.tables.pop(seq_id)
            for block in table.blocks:
                self.pool.release(block)
        for entry in self.tasks.values():
            for block in entry.blocks:
                self.pool.release(block)
        self.tasks.clear()
        self.pending_prefix_writes.clear()
        self.pool.forget_all()

    # -- slots ----------------------------------------------------------------------------------------------

    def slots(self, seq: Sequence, start: int, stop: int) -> list[int]:
        """Pool slots of ``seq``'s tokens ``[start, stop)``."""
        b, blocks = self.block_size, self.tables[seq.id].blocks
        return [blocks[i // b] * b + i % b for i in range(start, stop)]

    def prefix_slots(self, seq: Sequence) -> list[int]:
        table = self.tables[seq.id]
        if table.task is None or not table.task.num_prefix:
            return []
        b = self.block_size
        return [table.task.blocks[i // b] * b + i % b for i in range(table.task.num_prefix)]
