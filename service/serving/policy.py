"""Who may do what, and how much: admin calls, and the per-principal and whole-server limits.

A principal is whoever authentication says is calling (`rnnserve.api.auth`): a bearer token's
name, or a verified client certificate's. Without authentication every caller is the same
principal, "", so the per-principal limits then hold for all callers together.

The limits, each refused with its own error and counted by its `limit` name:
- live sequences one principal holds over all models (`principal_sequences`), and the whole
  server holds (`server_sequences`): RESOURCE_EXHAUSTED, checked when a sequence starts;
- requests per second of one principal (`principal_rate`) and of the whole server
  (`server_rate`): RESOURCE_EXHAUSTED, by token buckets, checked on every request, stream
  requests included;
- bytes of one request (`request_bytes`): RESOURCE_EXHAUSTED, checked before it is decoded.

The limits are this replica's: behind a load balancer, N replicas take up to N times them.
Everything here runs on the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from rnnserve.errors import CapacityExhausted, LimitExceeded, PermissionDenied

MAX_IDLE_BUCKETS = 10_000
"""Principals' rate buckets kept before the full (idle) ones are dropped: a dropped bucket is
recreated full, which is what it held."""


@dataclass(frozen=True)
class PolicySettings:
    """The settings of `Policy`; None is no limit."""

    authenticated: bool = False
    """Callers are authenticated (tokens or mutual TLS): admin calls need an admin."""
    admins: frozenset[str] = frozenset()
    """Principals that may load and unload models when callers are authenticated."""
    principal_max_sequences: int | None = None
    """Live sequences one principal may hold, over all models."""
    max_live_sequences: int | None = None
    """Live sequences the whole server may hold, over all models."""
    principal_requests_per_s: float | None = None
    """Requests per second one principal may send, on average."""
    principal_burst: int | None = None
    """Requests one principal may send at once above its rate (the bucket's size); None: one
    second's worth of its rate."""
    max_requests_per_s: float | None = None
    """Requests per second the whole server takes, on average (bursts of one second's worth)."""
    max_request_bytes: int | None = None
    """Bytes one request may take on the wire."""


class TokenBucket:
    """A token bucket: `rate` tokens a second up to `capacity`; a request takes one.

    The classic traffic-shaping algorithm (Turner, "New directions in communications", 1986;
    the metering of RFC 2697 and RFC 4115 uses it): over any interval of t seconds it admits
    at most capacity + rate * t requests.
    """

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def take(self, now: float) -> float:
        """Take a token at `now` (seconds): 0.0 if one was there, else the seconds until one
        will be (nothing taken)."""
        tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def full(self, now: float) -> bool:
        """Whether the bucket would be full at `now`."""
        return self.tokens + (now - self.stamp) * self.rate >= self.capacity


class Policy:
    """Admin calls and the limits of `PolicySettings` (event loop only).

    `admit` and `acquire_sequence` raise LimitExceeded (its `limit` names which); `require_admin`
    raises PermissionDenied. `clock` is `time.monotonic` but in tests.
    """

    def __init__(
        self, settings: PolicySettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._sequences: dict[str, int] = {}
        self._live = 0
        self._buckets: dict[str, TokenBucket] = {}
        s = settings
        self._server_bucket = (
            TokenBucket(s.max_requests_per_s, _one_second_of(s.max_requests_per_s), clock())
            if s.max_requests_per_s
            else None
        )
        self._limits_requests = bool(
            s.max_request_bytes or s.principal_requests_per_s or s.max_requests_per_s
        )
        self.limits_sequences = bool(s.principal_max_sequences or s.max_live_sequences)
        """Whether `acquire_sequence` can refuse (the sequence managers need not call it
        otherwise)."""

    def require_admin(self, principal: str) -> None:
        """PermissionDenied unless `principal` may load and unload models: anyone without
        authentication, a principal of the admin list with it."""
        if not self.settings.authenticated or principal in self.settings.admins:
            return
        raise PermissionDenied(
            f"loading and unloading models needs an admin principal; {principal!r} is not one "
            f"(the server's --auth-admins list)"
        )

    # ------------------------------------------------------------------ requests
    def admit(self, principal: str, nbytes: int) -> None:
        """Take one request of `nbytes` bytes from `principal`, or raise LimitExceeded."""
        if not self._limits_requests:
            return
        s = self.settings
        if s.max_request_bytes is not None and nbytes > s.max_request_bytes:
            raise LimitExceeded(
                f"the request takes {nbytes:,} bytes, over this server's limit of "
                f"{s.max_request_bytes:,} bytes a request (--max-request-bytes); send fewer time "
                f"steps or batch rows per request",
                "request_bytes",
            )
        now = self._clock()
        if s.principal_requests_per_s:
            bucket = self._buckets.get(principal)
            if bucket is None:
                bucket = self._new_bucket(principal, s.principal_requests_per_s, now)
            wait = bucket.take(now)
            if wait:
                raise LimitExceeded(
                    f"{_who(principal)} sent more than {s.principal_requests_per_s:g} requests "
                    f"per second (bursts of {bucket.capacity:g}; --principal-requests-per-s); "
                    f"retry in {wait:.3f} s, or send more time steps per request",
                    "principal_rate",
                    wait,
                )
        if self._server_bucket is not None:
            wait = self._server_bucket.take(now)
            if wait:
                raise LimitExceeded(
                    f"the server takes at most {s.max_requests_per_s:g} requests per second "
                    f"(--max-requests-per-s) and is at it; retry in {wait:.3f} s",
                    "server_rate",
                    wait,
                )

    def _new_bucket(self, principal: str, rate: float, now: float) -> TokenBucket:
        if len(self._buckets) >= MAX_IDLE_BUCKETS:
            self._buckets = {p: b for p, b in self._buckets.items() if not b.full(now)}
        burst = self.settings.principal_burst
        bucket = TokenBucket(rate, burst if burst else _one_second_of(rate), now)
        self._buckets[principal] = bucket
        return bucket

    # ------------------------------------------------------------------ sequences
    def acquire_sequence(self, principal: str, force: bool = False) -> None:
        """Count a new live sequence of `principal`, or raise LimitExceeded (unless `force`:
        a sequence that was live before, made live again)."""
        held = self._sequences.get(principal, 0)
        if not force:
            self._check_room(principal, held)
        self._sequences[principal] = held + 1
        self._live += 1

    def _check_room(self, principal: str, held: int) -> None:
        """LimitExceeded when `principal`, holding `held` live sequences, or the server is at
        its limit."""
        s = self.settings
        if s.principal_max_sequences is not None and held >= s.principal_max_sequences:
            raise CapacityExhausted(
                f"{_who(principal)} already holds its maximum of {s.principal_max_sequences} "
                f"live sequences (--principal-max-sequences), over all models; end finished "
                f"sequences (sequence_end=true) or retry later",
                "principal_sequences",
            )
        if s.max_live_sequences is not None and self._live >= s.max_live_sequences:
            raise CapacityExhausted(
                f"the server already holds its maximum of {s.max_live_sequences} live "
                f"sequences (--max-live-sequences); retry later, or on another replica",
                "server_sequences",
            )

    def release_sequence(self, principal: str) -> None:
        """A live sequence of `principal` ended (or was evicted, or never got its state)."""
        held = self._sequences.get(principal, 0) - 1
        if held > 0:
            self._sequences[principal] = held
        else:
            self._sequences.pop(principal, None)
        self._live = max(self._live - 1, 0)

    def live_sequences(self, principal: str) -> int:
        """Live sequences `principal` holds now."""
        return self._sequences.get(principal, 0)


def _one_second_of(rate: float) -> int:
    return max(1, math.ceil(rate))


def _who(principal: str) -> str:
    if principal:
        return f"principal {principal!r}"
    return "all callers together (without authentication they are one principal)"
