"""The Redis state store: redis-py (with hiredis) on a real Redis server, one pipeline a call.

Imported only when `--state-store` names Redis. The client is synchronous on purpose: it is
called from the batch worker threads (one per model), which already run off the event loop
and run one batch at a time, so a round trip never blocks the loop and a model's round trips
never overlap. The connection pool makes the client safe to share between those threads.

Compare-and-set runs as a Lua script on the server (atomic there), by its SHA; after a Redis
restart forgets the scripts, the affected operations are loaded and run again (only those, as
the others in the pipeline did run).

With Sentinel (`redis+sentinel://`), redis-py's Sentinel client asks the Sentinels where the
primary is on each new connection and drops its connections when the primary moves; a round
trip during a failover fails (UNAVAILABLE) within the store timeout. With `min_replicas`, each
write round trip ends with Redis's WAIT (https://redis.io/docs/latest/commands/wait/): its
writes count as done only once that many replicas acknowledged them.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from redis.retry import Retry
from redis.sentinel import Sentinel

from rnnserve.errors import StoreUnavailable
from rnnserve.sessions.store import (
    ROUND_TRIP_BUCKETS,
    STAMP_OFFSET,
    STAMP_SIZE,
    Read,
    ReadResult,
    StoreStatistics,
    Write,
    WriteResult,
)

logger = logging.getLogger(__name__)

SENTINEL_SCHEME = "redis+sentinel://"
DEFAULT_SENTINEL_PORT = 26379

_STAMP_RANGE = f"{STAMP_OFFSET}, {STAMP_OFFSET + STAMP_SIZE - 1}"
_STAMP_IN_RECORD = f"{STAMP_OFFSET + 1}, {STAMP_OFFSET + STAMP_SIZE}"  # Lua counts from 1

# The record unless its stamp is still ARGV[1] (then ''); nil when there is no record.
_VALIDATE = f"""
if redis.call('GETRANGE', KEYS[1], {_STAMP_RANGE}) == ARGV[1] then return '' end
return redis.call('GET', KEYS[1])
"""

# Replace (or delete, when ARGV[2] is '') the record if its stamp is ARGV[1]: 1 done, 0 not.
# A record that already carries the new stamp is this very write, applied by an attempt whose
# reply was lost (redis-py retries a round trip once on a broken connection): done, not a race.
_COMPARE_AND_SET = f"""
local current = redis.call('GETRANGE', KEYS[1], {_STAMP_RANGE})
local record = ARGV[2]
if record ~= '' and current == string.sub(record, {_STAMP_IN_RECORD}) then return 1 end
if current ~= ARGV[1] then return 0 end
if record == '' then
  redis.call('DEL', KEYS[1])
elseif ARGV[3] == '0' then
  redis.call('SET', KEYS[1], record)
else
  redis.call('SET', KEYS[1], record, 'PX', ARGV[3])
end
return 1
"""

_SCRIPTS = {
    hashlib.sha1(source.encode()).hexdigest(): source for source in (_VALIDATE, _COMPARE_AND_SET)
}
_VALIDATE_SHA, _CAS_SHA = _SCRIPTS


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


class RedisStore:
    """The state store on a Redis server a URL names (`redis://`, `rediss://`, `unix://`), or
    on the primary a set of Sentinels names (`redis+sentinel://`, see `sentinel_client`).

    Each `read` or `write` is one pipelined round trip; `timeout_s` bounds connecting and
    each reply, in seconds. A round trip that fails raises StoreUnavailable; an operation that
    fails alone has a StoreUnavailable as its result. With `min_replicas` > 0 a write round
    trip waits up to `timeout_s` for that many replicas to acknowledge it; when fewer do, each
    of its writes has a StoreUnavailable as its result, although the primary applied it.
    """

    shared = True

    def __init__(self, url: str, timeout_s: float, min_replicas: int = 0) -> None:
        if min_replicas < 0:
            raise ValueError(f"min_replicas must be 0 or more, got {min_replicas}")
        self.name = redact(url)
        self.min_replicas = min_replicas
        self._wait_ms = max(1, round(timeout_s * 1000))
        # A WAIT's reply comes when its own timeout ends: the socket must outlast it.
        reply_s = timeout_s * 2 if min_replicas else timeout_s
        # One retry without backoff: a pooled connection broken by a Redis restart reconnects
        # at once, while a Redis that is down fails fast, as UNAVAILABLE.
        options: dict[str, Any] = {
            "socket_timeout": reply_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1),
        }
        if url.startswith(SENTINEL_SCHEME):
            self._redis = sentinel_client(url, timeout_s, **options)
        else:
            # A URL's own query options (socket_timeout=...) win over these defaults.
            self._redis = redis.Redis.from_url(url, **options)
        self._lock = threading.Lock()
        self._round_trips = [0] * (len(ROUND_TRIP_BUCKETS) + 1)
        self._round_trip_s = 0.0
        self._failovers = 0
        self._replication_failures = 0
        self._primary: Any = None

    def read(self, reads: Sequence[Read]) -> list[ReadResult]:
        """GET each record, GETDEL it (`take`), or validate it by script (`unless`)."""
        commands: list[tuple[Any, ...]] = []
        for op in reads:
            if op.unless:
                commands.append(("EVALSHA", _VALIDATE_SHA, 1, op.key, op.unless))
            elif op.take:
                commands.append(("GETDEL", op.key))
            else:
                commands.append(("GET", op.key))
        return [
            self._failure(r) if isinstance(r, Exception) else r for r in self._round_trip(commands)
        ]

    def write(self, writes: Sequence[Write]) -> list[WriteResult]:
        """SET each record (PX: its ttl in milliseconds) or DEL it; by compare-and-set script
        when it names the stamp it `expect`s."""
        commands: list[tuple[Any, ...]] = []
        for op in writes:
            ttl_ms = max(1, round(op.ttl_s * 1000)) if op.ttl_s > 0 else 0
            if op.expect is not None:
                record = op.record if op.record is not None else b""
                commands.append(("EVALSHA", _CAS_SHA, 1, op.key, op.expect, record, ttl_ms))
            elif op.record is None:
                commands.append(("DEL", op.key))
            elif ttl_ms:
                commands.append(("SET", op.key, op.record, "PX", ttl_ms))
            else:
                commands.append(("SET", op.key, op.record))
        wait = self.min_replicas > 0 and bool(commands)
        replies = self._round_trip(commands, wait)
        replicated = self._replicated(replies.pop()) if wait else None
        results: list[WriteResult] = []
        for command, result in zip(commands, replies, strict=True):
            if replicated is not None and result is not False:
                results.append(replicated)  # whatever the primary did, it may not survive it
            elif isinstance(result, Exception):
                results.append(self._failure(result))
            else:
                # DEL answers how many keys it removed: none left is what was asked for too.
                results.append(True if command[0] == "DEL" else bool(result))
        return results

    def ping(self) -> None:
        """PING Redis; StoreUnavailable when it does not answer."""
        try:
            self._redis.ping()
            replicas = self._redis.info("replication").get("connected_slaves", 0)
        except RedisError as error:
            raise self._failure(error) from error
        if replicas < self.min_replicas:
            logger.warning(
                "state store %s has %d connected replicas, fewer than --state-min-replicas %d: "
                "every stateful step fails UNAVAILABLE until more replicas connect",
                self.name, replicas, self.min_replicas,
            )  # fmt: skip

    def statistics(self) -> StoreStatistics:
        """Round trips by duration, failovers and replication failures so far."""
        with self._lock:
            return StoreStatistics(
                tuple(self._round_trips),
                self._round_trip_s,
                self._failovers,
                self._replication_failures,
            )

    def close(self) -> None:
        """Close its connections."""
        self._redis.close()

    def _replicated(self, acknowledged: Any) -> StoreUnavailable | None:
        """None when WAIT's reply says enough replicas have the writes; else their error."""
        if isinstance(acknowledged, int) and acknowledged >= self.min_replicas:
            return None
        with self._lock:
            self._replication_failures += 1
        found = f"{acknowledged} of" if isinstance(acknowledged, int) else f"({acknowledged}),"
        return StoreUnavailable(
            f"state store {self.name}: the state was written to the primary but only "
            f"{found} {self.min_replicas} replicas acknowledged it within "
            f"{self._wait_ms} ms (--state-min-replicas), so a failover could lose it; send the "
            f"request again with the sequence_version you sent it with: ABORTED then means "
            f"this step did take effect"
        )

    def _round_trip(self, commands: list[tuple[Any, ...]], wait: bool = False) -> list[Any]:
        """Each command's reply (or its error), in one pipeline; with `wait`, one more reply
        at the end: WAIT's count of replicas that acknowledged the writes."""
        if not commands:
            return []
        if wait:
            commands = [*commands, ("WAIT", self.min_replicas, self._wait_ms)]
        results = self._pipeline(commands)
        unknown = [k for k, r in enumerate(results) if isinstance(r, NoScriptError)]
        if unknown:
            try:
                for source in _SCRIPTS.values():
                    self._redis.script_load(source)
            except RedisError as error:
                raise self._failure(error) from error
            rerun = [commands[k] for k in unknown]
            if wait:  # the scripts' writes need their own wait
                rerun.append(commands[-1])
                unknown.append(len(commands) - 1)
            again = self._pipeline(rerun)
            for k, result in zip(unknown, again, strict=True):
                results[k] = result
        return results

    def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        started = time.perf_counter()
        try:
            pipe = self._redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            return pipe.execute(raise_on_error=False)
        except RedisError as error:
            raise self._failure(error) from error
        finally:
            self._count(time.perf_counter() - started)

    def _count(self, seconds: float) -> None:
        """Count a round trip; notice a primary that moved (Sentinel)."""
        primary = getattr(self._redis.connection_pool, "master_address", None)
        with self._lock:
            self._round_trips[bisect.bisect_left(ROUND_TRIP_BUCKETS, seconds)] += 1
            self._round_trip_s += seconds
            moved = primary is not None and self._primary not in (None, primary)
            if moved:
                self._failovers += 1
            before, self._primary = self._primary, primary or self._primary
        if moved:
            logger.warning("state store %s: the primary moved from %s to %s", self.name, before,
                           primary)  # fmt: skip

    def _failure(self, error: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"state store {self.name} is unavailable: {error}")


def sentinel_client(url: str, timeout_s: float, **options: Any) -> redis.Redis:
    """A client of the primary that Sentinels name, from
    `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/primary-name[/db]`
    (the Sentinels' addresses, default port 26379; the password is the primary's and its
    replicas'; `?sentinel_password=...` when the Sentinels ask for one).

    The scheme is the one other Redis clients take (e.g. Spring Data Redis, Lettuce's
    `redis-sentinel://`). `options` go to the primary's connections. Raises ValueError for a
    URL that names no Sentinel or no primary.
    """
    rest = url.removeprefix(SENTINEL_SCHEME)
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    credentials, _, hosts = netloc.rpartition("@")
    user, _, password = credentials.partition(":") if credentials else ("", "", "")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2:
        raise ValueError(
            f"state store {redact(url)}: expected redis+sentinel://[:password@]host:port"
            f"[,host:port...]/primary-name[/db]"
        )
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":") if ":" in host else (host, "", "")
        try:
            sentinels.append((name or host, int(port) if port else DEFAULT_SENTINEL_PORT))
        except ValueError:
            raise ValueError(f"state store {redact(url)}: {host!r} is not host:port") from None
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ValueError(
            f"state store {redact(url)}: database {parts[1]!r} is not a number"
        ) from None
    extra = urllib.parse.parse_qs(query)
    sentinel_password = extra.get("sentinel_password", [None])[0]
    manager = Sentinel(  # type: ignore[no-untyped-call]
        sentinels,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        sentinel_kwargs={
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "password": sentinel_password,
        },
    )
    client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
        parts[0],
        db=db,
        username=urllib.parse.unquote(user) or None,
        password=urllib.parse.unquote(password) or None,
        **options,
    )
    return client
