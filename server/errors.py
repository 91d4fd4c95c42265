"""What the service rules refuse (who may call, which task a name means, quotas), as domain errors.

They carry the message the client will read and nothing about HTTP: :mod:`server.api.errors` is the one
place that gives each its status code and headers. The store's own errors (``InvalidTaskName``,
``StoreUnavailable``) are mapped there too.
"""

from __future__ import annotations


class Unauthenticated(Exception):
    """No API key, or one this server does not know."""


class Forbidden(Exception):
    """The caller is known but may not do this."""


class UnknownTenant(ValueError):
    """An admin named a tenant this server does not have."""


class UnknownTask(LookupError):
    """No task of that name is visible to the caller (one another tenant owns is answered the same way)."""


RETRY_AFTER_S = 1  # what a 429/503 tells clients to wait before retrying (a queue moves in about a second)


class TooManyInFlight(Exception):
    """Over the tenant's requests in flight; worth retrying after ``retry_after`` seconds, once some finish.
    (Over its stored tasks or bytes is the store's ``QuotaExceeded``, checked atomically with the write.)"""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class GenerationFailed(RuntimeError):
    """The engine failed a sequence with an internal error (a 500)."""


class GenerationUnavailable(GenerationFailed):
    """The engine could not serve a sequence at all: its process is gone, the server is draining, or the
    request's deadline passed in the queue (a 503; retry after ``retry_after`` s, or never when None)."""

    def __init__(self, message: str, retry_after: int | None = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after
