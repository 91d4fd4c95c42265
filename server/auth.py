"""Tenants, API keys and quotas (``--auth-file``), and who may see which task.

Without an auth file the server is open: one implicit tenant, ``default``, whose tasks use unqualified
store keys. With one, every route but ``/healthz`` needs ``Authorization: Bearer KEY`` (``/metrics`` and
the API docs too, unless ``--public-metrics`` / ``--public-docs``); :mod:`server.middleware` decides it
from the headers.
A tenant's tasks live in its own namespace (two tenants may each own ``summary``); admins publish tasks
to the ``_shared`` namespace, which every tenant can use but not change. A task another tenant owns is
answered exactly like a task that does not exist (404), so names do not leak.

Auth file shape::

    {"admin_keys": ["..."],
     "tenants": {"acme": {"api_keys": ["sha256:<hex>", "plain-key"], "max_tasks": 100,
                          "max_bytes": 100000000, "max_concurrent_requests": 8}}}
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from prefixes.keys import TASK_NAME, task_key
from server.errors import Forbidden, Unauthenticated

DEFAULT_TENANT = "default"
ADMIN_TENANT = "admin"  # the tenant label admins' own requests are counted under
SHARED_NAMESPACE = "_shared"


class AuthConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    name: str
    max_tasks: int | None = None
    max_bytes: int | None = None
    max_concurrent_requests: int | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. ``namespace`` is where their own tasks live (None: unqualified, open mode)."""

    tenant: str
    is_admin: bool
    namespace: str | None
    policy: TenantPolicy

    def lookup_keys(self, name: str) -> list[str]:
        """Store keys a task name may refer to for this caller, in lookup order: own, then shared."""
        if self.namespace is None:
            return [task_key(name)]
        own = [] if self.is_admin else [task_key(name, self.namespace)]
        return own + [task_key(name, SHARED_NAMESPACE)]

    def write_key(self, name: str, tenant: str | None = None) -> str:
        """The key this caller's upload/delete of ``name`` addresses. Admins write shared tasks, or a
        tenant's with ``tenant=``; tenants only their own."""
        if self.namespace is None:
            return task_key(name)
        if tenant is not None and not self.is_admin:
            raise Forbidden("Only admin keys may act on another tenant's tasks.")
        namespace = (tenant or SHARED_NAMESPACE) if self.is_admin else self.namespace
        return task_key(name, namespace)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _stored_digest(entry: str, where: str) -> bytes:
    """Keys are stored as ``sha256:<hex>`` or in plain text; either way only the digest is kept."""
    if not isinstance(entry, str) or not entry:
        raise AuthConfigError(f"{where}: API keys must be non-empty strings")
    if entry.startswith("sha256:"):
        try:
            digest = bytes.fromhex(entry[len("sha256:"):])
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise AuthConfigError(f"{where}: 'sha256:' must be followed by 64 hex digits")
        return digest
    return _digest(entry)


def _optional_positive(value, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AuthConfigError(f"{where} must be a positive integer")
    return value


class AuthConfig:
    def __init__(self, tenants: dict[str, tuple[TenantPolicy, list[bytes]]], admin_digests: list[bytes]):
        self._tenants = tenants
        self._admin_digests = admin_digests

    @property
    def is_open(self) -> bool:
        return not self._tenants and not self._admin_digests

    def has_tenant(self, tenant: str) -> bool:
        return tenant in self._tenants

    def policy(self, tenant: str) -> TenantPolicy:
        entry = self._tenants.get(tenant)
        return entry[0] if entry else TenantPolicy(tenant)

    @classmethod
    def open(cls) -> AuthConfig:
        return cls({}, [])

    @classmethod
    def load(cls, path: Path) -> AuthConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AuthConfigError(f"--auth-file {path}: {exc}") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("tenants", {}), dict):
            raise AuthConfigError(f"--auth-file {path}: expected an object with 'tenants' and 'admin_keys'")
        admin = [_stored_digest(k, "admin_keys") for k in raw.get("admin_keys", [])]
        tenants = {}
        for name, spec in raw.get("tenants", {}).items():
            where = f"tenants.{name}"
            if not TASK_NAME.fullmatch(name) or name in (DEFAULT_TENANT, ADMIN_TENANT):
                raise AuthConfigError(f"{where}: tenant names follow task-name rules and may not be "
                                      f"'{DEFAULT_TENANT}' or '{ADMIN_TENANT}'")
            if not isinstance(spec, dict) or not spec.get("api_keys"):
                raise AuthConfigError(f"{where}: needs a non-empty 'api_keys' list")
            policy = TenantPolicy(
                name,
                max_tasks=_optional_positive(spec.get("max_tasks"), f"{where}.max_tasks"),
                max_bytes=_optional_positive(spec.get("max_bytes"), f"{where}.max_bytes"),
                max_concurrent_requests=_optional_positive(spec.get("max_concurrent_requests"),
                                                           f"{where}.max_concurrent_requests"),
            )
            tenants[name] = (policy, [_stored_digest(k, f"{where}.api_keys") for k in spec["api_keys"]])
        if not tenants and not admin:
            raise AuthConfigError(f"--auth-file {path}: defines no tenants and no admin keys")
        return cls(tenants, admin)

    def authenticate(self, authorization: str | None) -> Principal:
        if self.is_open:
            return Principal(DEFAULT_TENANT, True, None, TenantPolicy(DEFAULT_TENANT))
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Missing API key: send 'Authorization: Bearer <key>'.")
        digest = _digest(token.strip())
        # Compare against every key, always, so timing does not reveal which (or whether any) matched.
        match: Principal | None = None
        for known in self._admin_digests:
            if hmac.compare_digest(digest, known) and match is None:
                match = Principal(ADMIN_TENANT, True, SHARED_NAMESPACE, TenantPolicy(ADMIN_TENANT))
        for name, (policy, digests) in self._tenants.items():
            for known in digests:
                if hmac.compare_digest(digest, known) and match is None:
                    match = Principal(name, False, name, policy)
        if match is None:
            raise Unauthenticated("Invalid API key.")
        return match


def current_principal(request: Request) -> Principal:
    """The caller, as the request gate (server.middleware) authenticated it from the headers."""
    principal = getattr(request.state, "principal", None)
    if principal is None:  # a public route that asks who calls: authenticate it here
        principal = request.app.state.server.auth.authenticate(request.headers.get("authorization"))
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
