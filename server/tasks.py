"""The service rules between HTTP and the store: which task a name means for a caller, and quotas."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import asynccontextmanager

from starlette.concurrency import run_in_threadpool

from prefixes.keys import TASK_NAME, InvalidTaskName, check_task_name
from prefixes.records import ResidentPrefix, TaskRecord
from prefixes.store import PrefixStore, Quota, StoreUnavailable, TaskNotFound
from server.auth import SHARED_NAMESPACE, AuthConfig, Principal
from server.errors import RETRY_AFTER_S, TooManyInFlight, UnknownTask, UnknownTenant


def write_key(auth: AuthConfig, principal: Principal, name: str, tenant: str | None) -> str:
    """The store key an upload or delete of task ``name`` addresses; ``tenant``: an admin acting for one.
    :class:`InvalidTaskName` when ``tenant`` cannot be a tenant's name, :class:`UnknownTenant` (404) when it
    is not one of this server's tenants."""
    check_task_name(name)
    if tenant is not None and principal.is_admin:
        if not TASK_NAME.fullmatch(tenant):
            raise InvalidTaskName(f"tenant={tenant!r} is not a tenant name: tenant names follow the "
                                  "task-name rules (1-128 letters, digits, '.', '_' or '-', starting with a "
                                  "letter or digit).")
        if auth.is_open:
            raise UnknownTenant(f"tenant={tenant!r}: this server has no tenants (it runs without "
                                "--auth-file); drop the tenant parameter.")
        if not auth.has_tenant(tenant):
            raise UnknownTenant(f"tenant={tenant!r} is not a tenant of this server: name one from its "
                                "--auth-file, or drop the parameter to publish a shared task.")
    return principal.write_key(name, tenant)


def _first_visible(store: PrefixStore, principal: Principal, name: str, load):
    unavailable: StoreUnavailable | None = None
    for key in principal.lookup_keys(check_task_name(name)):
        try:
            return load(key)
        except TaskNotFound:
            continue
        except StoreUnavailable as exc:  # another key may still be served from this replica's copies
            unavailable = exc
    if unavailable is not None:
        raise unavailable
    raise UnknownTask(f"Unknown task {name!r}: upload it with POST /prefixes/{name} first.")


async def resolve_prefix(store: PrefixStore, principal: Principal, name: str | None) -> ResidentPrefix | None:
    """The served prefix a caller means by ``name`` (None: the base model). :class:`UnknownTask` when not
    visible."""
    if name is None:
        return None
    return await run_in_threadpool(_first_visible, store, principal, name, store.get)


async def resolve_record(store: PrefixStore, principal: Principal, name: str) -> TaskRecord:
    return await run_in_threadpool(_first_visible, store, principal, name, store.info)


def visible_records(store: PrefixStore, principal: Principal) -> list[TaskRecord]:
    if principal.namespace is None:
        return store.list()
    own = [] if principal.is_admin else store.list(principal.namespace)
    return own + store.list(SHARED_NAMESPACE)


def storage_quota(principal: Principal) -> Quota | None:
    """The limits the store enforces with this caller's uploads (None: admins, and tenants without any)."""
    policy = principal.policy
    if principal.is_admin or (policy.max_tasks is None and policy.max_bytes is None):
        return None
    return Quota(policy.max_tasks, policy.max_bytes)


class ConcurrencyLimiter:
    """Per-tenant cap on requests in flight (``max_concurrent_requests``); lives on the event loop."""

    def __init__(self, on_reject: Callable[[str], None]):
        """``on_reject(tenant)`` is told about each refusal (for metrics)."""
        self._in_flight: defaultdict[str, int] = defaultdict(int)
        self._on_reject = on_reject

    @asynccontextmanager
    async def slot(self, principal: Principal):
        # check-and-increment has no await in between: atomic on the event loop
        limit = principal.policy.max_concurrent_requests
        if limit is not None and self._in_flight[principal.tenant] >= limit:
            self._on_reject(principal.tenant)
            raise TooManyInFlight(f"Tenant {principal.tenant!r} has {limit} requests in flight, its limit; "
                                "retry shortly.", RETRY_AFTER_S)
        self._in_flight[principal.tenant] += 1
        try:
            yield
        finally:
            self._in_flight[principal.tenant] -= 1
