"""Who computes what in the next step: the scheduler knows counts, lengths and blocks, never tensors.

Each step has a budget of ``max_step_tokens`` tokens, spent in this order:

1. every running sequence that is decoding gets its next token (taking a new block when its last one is
   full; when no block is left, the newest running sequences are preempted: their blocks are freed and they
   go back to the front of their queue, to be recomputed from their tokens when they rejoin, as vLLM V1
   does, so nothing fails for lack of memory while others finish);
2. running sequences part-way through their prefill get their next chunk, oldest first;
3. waiting sequences join, least recently served tenant first (each tenant's queue is first come, first
   served), while the batch has rows, the step has tokens, and the blocks their first chunk needs now
   (plus a small watermark) are free - not their worst case. A joining sequence first takes whatever full
   blocks of its tokens the prefix cache holds.

A prompt longer than ``long_prefill_threshold`` gets at most that many tokens of a step while others need
the budget, and at most ``max_long_prefills`` such prompts prefill at once, so requests that arrive behind
a long prompt get their first token without waiting for all of it (vLLM's ``--long-prefill-token-threshold``
and ``--max-long-partial-prefills``); while that many prefill, a short request jumps the long ones queued
ahead of it (in its own tenant's queue, and other tenants are never held by one tenant's long prompts).
Whatever budget is left at the end goes to the long prompts.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence

LOOKAHEAD = 16  # waiting requests of a tenant looked at for one that may jump long prompts ahead of it


@dataclass(slots=True)
class StepPlan:
    decode: list[Sequence] = field(default_factory=list)  # one token each: their last generated one
    prefill: list[list] = field(default_factory=list)  # [sequence, tokens this step], in packed order
    joined: list[Sequence] = field(default_factory=list)  # joined the batch for the first time
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_step_tokens: int,
                 long_prefill_threshold: int, max_long_prefills: int = 1, watermark: float = 0.01):
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.long_prefill_threshold = long_prefill_threshold
        self.max_long_prefills = max_long_prefills
        # blocks kept free when a request joins a running batch (room for the running ones' next tokens)
        self.watermark = max(1, int(watermark * blocks.num_blocks)) if watermark else 0
        self.running: list[Sequence] = []  # in the order they (re)joined: the newest is preempted first
        self._queues: dict[str, deque[Sequence]] = {}  # tenant -> its waiting requests, in arrival order
        self._last_served: dict[str, int] = {}  # tenant -> admission counter when last served
        self._admissions = 0

    # -- the waiting queues ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def add(self, seq: Sequence) -> None:
        self._queues.setdefault(seq.tenant, deque()).append(seq)

    def remove(self, seq: Sequence) -> bool:
        queue = self._queues.get(seq.tenant)
        if queue is None or seq not in queue:
            return False
        queue.remove(seq)
        if not queue:
            del self._queues[seq.tenant]
        return True

    def drain(self) -> list[Sequence]:
        waiting = [seq for q in self._queues.values() for seq in q]
        self._queues.clear()
        return waiting

    def finish(self, seq: Sequence, trusted: bool = True) -> None:
        """``seq`` leaves the batch; its blocks go back (see :meth:`BlockManager.leave`)."""
        self.running.remove(seq)
        self.blocks.leave(seq, trusted)

    # -- one step -------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_step_tokens
        for seq in list(self.running):
            if seq in plan.preempted or seq.num_pending != 1:
                continue
            if self._make_room(seq, 1, plan):
                plan.decode.append(seq)
                budget -= 1
        long_prefills = 0
        for seq in list(self.running):
            if seq in plan.preempted or seq.num_pending == 1 or budget <= 0:
                continue
            count = self._chunk(seq.num_pending, budget)
            if self._make_room(seq, count, plan):
                plan.prefill.append([seq, count])
                budget -= count
                long_prefills += seq.num_pending > self.long_prefill_threshold
        budget = self._admit(plan, budget, long_prefills)
        for entry in plan.prefill:  # what is left goes to the prompts that were held to the threshold
            seq, count = entry
            extra = min(seq.num_pending - count, budget)
            if extra > 0 and self.blocks.new_blocks(seq, count + extra) <= self.blocks.num_free:
                self.blocks.grow(seq, count + extra)
                entry[1] += extra
                budget -= extra
        return plan

    def _chunk(self, pending: int, budget: int) -> int:
        if pending > self.long_prefill_threshold:
            return min(self.long_prefill_threshold, budget)
        return min(pending, budget)

    def _make_room(self, seq: Sequence, tokens: int, plan: StepPlan) -> bool:
        """Take the blocks ``seq`` needs for ``tokens`` more tokens, preempting the newest running sequences
        while they are short; False when ``seq`` itself had to be preempted."""
        while self.blocks.new_blocks(seq, tokens) > self.blocks.num_free:
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        self.blocks.grow(seq, tokens)
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.blocks.preempt(seq)
        seq.num_preemptions += 1
        plan.preempted.append(seq)
        for scheduled in (plan.decode, plan.prefill):  # a victim scheduled earlier in this step leaves it
            for i, entry in enumerate(scheduled):
                if (entry[0] if isinstance(entry, list) else entry) is seq:
                    del scheduled[i]
                    break
        self._queues.setdefault(seq.tenant, deque()).appendleft(seq)

    def _admit(self, plan: StepPlan, budget: int, long_prefills: int) -> int:
        held: set[str] = set()  # tenants whose waiting requests are all long while long prefills are full
        while budget > 0 and len(self.running) < self.max_batch_size:
            tenants = [t for t in self._queues if t not in held]
            if not tenants:
                break
            tenant = min(tenants, key=lambda t: self._last_served.get(t, -1))  # ties: earliest queue
            queue = self._queues[tenant]
            if queue[0] in plan.preempted:
                break  # preempted in this step for lack of blocks: it waits for the next
            picked = self._next_of(queue, long_prefills >= self.max_long_prefills)
            if picked is None:
                held.add(tenant)
                continue
            seq, cached, pending = picked
            long = pending > self.long_prefill_threshold
            count = self._chunk(pending, budget)
            watermark = self.watermark if self.running else 0  # alone, a request may use every block
            if self.blocks.blocks_to_join(seq, count, cached) + watermark > self.blocks.num_free:
                break
            queue.remove(seq)
            if not queue:
                del self._queues[tenant]
            self._last_served[tenant] = self._admissions
            self._admissions += 1
            self.blocks.join(seq, cached)
            self.blocks.grow(seq, count)
            self.running.append(seq)
            if not seq.num_preemptions:  # a preempted one rejoins: it was admitted before
                plan.joined.append(seq)
            plan.prefill.append([seq, count])
            budget -= count
            long_prefills += long
        return budget

    def _next_of(self, queue: deque[Sequence], long_ones_wait: bool) -> tuple[Sequence, list, int] | None:
        """The request of a tenant's queue to admit next, with its cached blocks and the tokens it has to
        prefill: the first in line, except that while long prefills are full a short request behind long
        ones goes first (vLLM's short prompts jumping the queue); the long ones keep their order. Only the
        first few are looked at: each look hashes the request's prompt for the prefix cache."""
        for seq in itertools.islice(queue, LOOKAHEAD):
            cached = self.blocks.cached_prefix(seq)
            pending = seq.num_tokens - len(cached) * self.blocks.block_size
            if not (long_ones_wait and pending > self.long_prefill_threshold):
                return seq, cached, pending
        return None
