"""Open the state store a `--state-store` value names (redis is imported only when named)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from rnnserve.sessions.store import MemoryStore, StateStore, StoreAccess

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
"""URL schemes of a Redis state store (TCP, TLS, a Unix socket, the primary of Sentinels, a
Cluster)."""


def url_password(url: str) -> str | None:
    """The password a store URL holds (None when it holds none)."""
    password = urlsplit(url).password
    return unquote(password) if password is not None else None


def open_store(
    url: str, timeout_s: float, access: StoreAccess | None = None, min_replicas: int = 0
) -> StateStore:
    """The store `url` names: `memory`, or a Redis URL (`REDIS_SCHEMES`) logged in with `access`.

    `timeout_s` bounds one round trip to the store, in seconds; `min_replicas` is how many
    replicas each write must reach (Redis only). Raises ValueError for a URL of no known kind,
    or for a replica count the store cannot give; UnusableCredentials for a password file that
    cannot be read.
    """
    if url == "memory" and not min_replicas:
        return MemoryStore()
    if url.startswith(REDIS_SCHEMES):
        from rnnserve.sessions.redis_store import RedisStore, client_options

        if url.startswith("redis+cluster://"):
            from rnnserve.sessions.redis_cluster import ClusterPipelines

            options = client_options(url, timeout_s, min_replicas, access)
            return RedisStore(url, timeout_s, access, min_replicas, ClusterPipelines(url, options))
        return RedisStore(url, timeout_s, access, min_replicas)
    if min_replicas:
        raise ValueError("--state-min-replicas needs a Redis state store")
    raise ValueError(f"unknown state store {url!r}: use memory or redis://host:port/db")
