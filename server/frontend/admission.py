"""Admission control in the HTTP process, where a refusal can still be an HTTP status: how many requests
wait for a place in the engine's batch, per tenant, and whether more may.

At most ``max_waiting`` sequences wait for the batch (past it, :class:`EngineOverloaded`: a 503 with
``Retry-After``); a dead, stuck or draining engine refuses with :class:`EngineUnavailable` (503).
"""

from __future__ import annotations

from server.errors import RETRY_AFTER_S


class EngineUnavailable(RuntimeError):
    """The engine process is not serving (it died or stalled and is being replaced, it is down for good, or
    the server is shutting down): a 503, with ``Retry-After: retry_after`` unless that is None (retrying
    this server cannot succeed)."""

    def __init__(self, message: str, retry_after: int | None = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: retry later (503 with Retry-After)."""


class WaitingQueue:
    """The requests submitted that have not joined the batch yet, counted per tenant."""

    def __init__(self, max_batch_size: int, max_waiting: int):
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.num_waiting = 0
        self._by_tenant: dict[str, int] = {}  # only tenants with some

    def count(self, tenant: str, delta: int) -> None:
        self.num_waiting += delta
        left = self._by_tenant.get(tenant, 0) + delta
        if left:
            self._by_tenant[tenant] = left
        else:
            self._by_tenant.pop(tenant, None)

    def check(self, count: int, tenant: str, num_running: int) -> None:
        """Raise :class:`EngineOverloaded` unless ``count`` more sequences of ``tenant`` may wait now.

        The queue is what cannot join the batch at its next step (requests beyond its free rows). Past its
        limit a tenant still gets in while it holds less than its fair share of the limit (the limit over the
        tenants waiting), so one tenant's flood fills the queue for itself, not for everyone; the queue then
        holds at most twice the limit. A request larger than the whole limit gets in when nothing waits."""
        free_rows = max(0, self.max_batch_size - num_running)
        queued = self.num_waiting - free_rows
        limit = self.max_waiting
        if not self.num_waiting or queued + count <= limit:
            return
        waiting_tenants = len(self._by_tenant) + (tenant not in self._by_tenant)
        if self._by_tenant.get(tenant, 0) + count <= limit // waiting_tenants:
            return
        raise EngineOverloaded(
            f"{max(queued, 0)} requests are already waiting for a place in the batch, the "
            "server's limit (--max-waiting-requests); retry shortly"
        )
