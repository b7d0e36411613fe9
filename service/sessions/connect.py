"""Open the state store a `--state-store` value names (redis is imported only when named)."""

from __future__ import annotations

from rnnserve.sessions.store import MemoryStore, StateStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""URL schemes of a Redis state store (TCP, TLS, a Unix socket)."""


def open_store(url: str, timeout_s: float) -> StateStore:
    """The store `url` names: `memory`, or a Redis URL (`REDIS_SCHEMES`).

    `timeout_s` bounds one round trip to the store, in seconds. Raises ValueError for a URL
    of no known kind.
    """
    if url == "memory":
        return MemoryStore()
    if url.startswith(REDIS_SCHEMES):
        from rnnserve.sessions.redis_store import RedisStore

        return RedisStore(url, timeout_s)
    raise ValueError(f"unknown state store {url!r}: use memory or redis://host:port/db")
