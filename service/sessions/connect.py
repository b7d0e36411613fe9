"""Open the state store a `--state-store` value names (redis is imported only when named)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from rnnserve.sessions.store import MemoryStore, StateStore, StoreAccess

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""URL schemes of a Redis state store (TCP, TLS, a Unix socket)."""


def url_password(url: str) -> str | None:
    """The password a store URL holds (None when it holds none)."""
    password = urlsplit(url).password
    return unquote(password) if password is not None else None


def open_store(url: str, timeout_s: float, access: StoreAccess | None = None) -> StateStore:
    """The store `url` names: `memory`, or a Redis URL (`REDIS_SCHEMES`) logged in with `access`.

    `timeout_s` bounds one round trip to the store, in seconds. Raises ValueError for a URL
    of no known kind, UnusableCredentials for a password file that cannot be read.
    """
    if url == "memory":
        return MemoryStore()
    if url.startswith(REDIS_SCHEMES):
        from rnnserve.sessions.redis_store import RedisStore

        return RedisStore(url, timeout_s, access or StoreAccess())
    raise ValueError(f"unknown state store {url!r}: use memory or redis://host:port/db")
