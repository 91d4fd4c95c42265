"""Task names and store keys: the naming rules every layer shares (no I/O, no store, no Redis).

A task *name* is what its owner calls it (``summary``). A store *key* is a name, optionally qualified by
its owner's namespace: ``acme~summary``. Namespaces follow the task-name rules; a leading ``_`` marks
namespaces the server reserves (e.g. ``_shared``). Keys are folder names on disk and Redis key suffixes,
so the rules exclude anything a path or a Redis pattern could read specially.
"""

from __future__ import annotations

import re

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAMESPACE_SEP = "~"
STORE_KEY = re.compile(r"(?:_?[A-Za-z0-9][A-Za-z0-9._-]{0,63}~)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class InvalidTaskName(ValueError):
    pass


def check_task_name(name: str) -> str:
    if not TASK_NAME.fullmatch(name):
        raise InvalidTaskName(
            f"Task name {name!r} is invalid: use 1-128 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit."
        )
    return name


def check_key(key: str) -> str:
    """``key`` if it is a valid store key; else InvalidTaskName, naming the name when the name is at fault."""
    if not STORE_KEY.fullmatch(key):
        check_task_name(split_key(key)[1])
        raise InvalidTaskName(f"Invalid namespace in store key {key!r}.")
    return key


def task_key(name: str, namespace: str | None = None) -> str:
    """The store key of task ``name`` owned by ``namespace`` (None: the unqualified single-user key)."""
    check_task_name(name)
    return name if namespace is None else f"{namespace}{NAMESPACE_SEP}{name}"


def split_key(key: str) -> tuple[str | None, str]:
    """(namespace, name) of a store key; namespace None for an unqualified key."""
    namespace, sep, name = key.rpartition(NAMESPACE_SEP)
    return (namespace if sep else None), name


def in_namespace(key: str, namespace: str | None) -> bool:
    """Whether ``key`` is a valid store key within ``namespace`` (None: any namespace)."""
    return bool(STORE_KEY.fullmatch(key)) and (namespace is None or split_key(key)[0] == namespace)
