"""The Redis state store: redis-py (with hiredis) on a real Redis server, one pipeline a call.

Imported only when `--state-store` names Redis. The client is synchronous on purpose: it is
called from the batch worker threads (one per model), which already run off the event loop
and run one batch at a time, so a round trip never blocks the loop and a model's round trips
never overlap. The connection pool makes the client safe to share between those threads.

TLS (rediss://) verifies the server's certificate by default, against `--state-store-ca` or the
system's CAs, and checks that it names the URL's host, as redis-py does. A password or
certificate the two sides do not accept is StoreRejected, which the server refuses to start
with: no wait makes it right.

Compare-and-set runs as a Lua script on the server (atomic there), by its SHA; after a Redis
restart forgets the scripts, the affected operations are loaded and run again (only those, as
the others in the pipeline did run).

Every command it sends is safe to send twice: GET, the validating script (reads only), SET of
a record with its own stamp, DEL, WAIT, and the compare-and-set script, which counts a record
already carrying the new stamp as done. That matters because a reply can be lost after the
command ran (a busy Redis past the timeout, a connection dropped in between). Such a write
round trip fails StoreOutcomeUnknown, never "not applied"; the next read settles it from the
stored stamp. A lost reply is never retried after a timeout, so that a round trip waits for
Redis about `timeout_s` at most; only a connection that breaks at once (a pooled connection
that a Redis restart closed) is replaced and the round trip sent once more.

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
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel

from rnnserve.errors import (
    StoreOutcomeUnknown,
    StoreRejected,
    StoreUnavailable,
    UnusableCredentials,
)
from rnnserve.sessions.store import (
    ROUND_TRIP_BUCKETS,
    STAMP_OFFSET,
    STAMP_SIZE,
    Read,
    ReadResult,
    StoreAccess,
    StoreStatistics,
    Verify,
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

# Replace the record by ARGV[2] (a record or a tombstone) if its stamp is ARGV[1]: 1 done, 0
# not. A record that already carries the new stamp is this very write, applied by an attempt
# whose reply was lost: done, not a race. (Never a DEL: a deletion sent again could not tell
# itself from another replica's; an END leaves a tombstone instead.)
_COMPARE_AND_SET = f"""
local current = redis.call('GETRANGE', KEYS[1], {_STAMP_RANGE})
local record = ARGV[2]
if current == string.sub(record, {_STAMP_IN_RECORD}) then return 1 end
if current ~= ARGV[1] then return 0 end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], record)
else
  redis.call('SET', KEYS[1], record, 'PX', ARGV[3])
end
return 1
"""

_SCRIPTS = {
    hashlib.sha1(source.encode()).hexdigest(): source for source in (_VALIDATE, _COMPARE_AND_SET)
}
_VALIDATE_SHA, CAS_SHA = _SCRIPTS
"""The scripts' SHA1 digests, by which EVALSHA names them (CAS_SHA: compare-and-set)."""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url)


Command = tuple[Any, ...]


class Wait(NamedTuple):
    """Redis's WAIT after a pipeline's writes: `replicas` within `timeout_ms`."""

    replicas: int
    timeout_ms: int


class Pipelines(Protocol):
    """How a RedisStore reaches Redis: one server (alone or behind Sentinel) or a Cluster."""

    failovers: int
    """Times a primary was seen to move."""

    def run(
        self, commands: list[Command], wait: Wait | None, count: Callable[[float], None]
    ) -> tuple[list[Any], list[Any]]:
        """Each command's reply (or its error, as a value), and for each the WAIT that
        followed it on its server: `(reply,)`, one tuple shared by the commands of a round trip
        (`(None,)` without `wait`). `count` hears each round trip's seconds. Raises RedisError
        when no reply came at all."""
        ...

    def replicas(self) -> int:
        """The fewest replicas connected to a primary; RedisError when one does not answer."""
        ...

    def eviction_policies(self) -> dict[str, str]:
        """Each primary's `maxmemory-policy`, by its address; RedisError when one does not
        answer (a primary that refuses CONFIG GET is left out)."""
        ...

    def close(self) -> None:
        """Close every connection."""
        ...


def run_on(
    client: redis.Redis,
    commands: list[Command],
    wait: Wait | None,
    count: Callable[[float], None],
    asking: bool = False,
) -> tuple[list[Any], Any]:
    """One pipeline on one server, WAIT at its end (when asked); the replies and WAIT's.

    `asking`: each command goes after an ASKING (the server is the target of a Cluster slot
    migration, where ASKING lets only the command that follows it in). After a Redis restart
    (or a migration target that never ran them) lacks the scripts, they are loaded and only the
    affected commands run again, each after its ASKING again, followed by a WAIT of their own:
    the fewer replicas of the two WAITs is what the round trip's writes reached.
    """
    results, acknowledged = _send(client, commands, wait, count, asking)
    unknown = [k for k, r in enumerate(results) if isinstance(r, NoScriptError)]
    if unknown:
        for source in _SCRIPTS.values():
            client.script_load(source)
        again, also = _send(client, [commands[k] for k in unknown], wait, count, asking)
        for k, result in zip(unknown, again, strict=True):
            results[k] = result
        if wait is not None:
            acknowledged = _fewer(acknowledged, also)
    return results, acknowledged


def _send(
    client: redis.Redis,
    commands: list[Command],
    wait: Wait | None,
    count: Callable[[float], None],
    asking: bool,
) -> tuple[list[Any], Any]:
    batch = [c for command in commands for c in (("ASKING",), command)] if asking else commands
    if wait is not None:
        batch = [*batch, ("WAIT", *wait)]
    results = _pipeline(client, batch, count)
    acknowledged = results.pop() if wait is not None else None
    return (results[1::2] if asking else results), acknowledged


def _fewer(first: Any, second: Any) -> Any:
    """Of two WAIT replies, the one that says fewer replicas (or the error)."""
    if not isinstance(first, int):
        return first
    if not isinstance(second, int):
        return second
    return min(first, second)


def _pipeline(
    client: redis.Redis, commands: list[Command], count: Callable[[float], None]
) -> list[Any]:
    started = time.perf_counter()
    try:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        return pipe.execute(raise_on_error=False)
    finally:
        count(time.perf_counter() - started)


class OneServer:
    """One Redis server, named by a URL or found through Sentinels (`sentinel_client`).

    With `primary_only`, each pipeline starts with ROLE, and one that reached a replica fails
    whole (ReadOnlyError: a replica applied none of its writes). Sentinel needs it: during a
    failover a Sentinel that has not yet heard of it still names the old primary, and if that
    node is already back as a replica (empty while it syncs, and serving reads meanwhile), its
    answers would say sequences do not exist.
    """

    def __init__(self, client: redis.Redis, primary_only: bool = False) -> None:
        self.client = client
        self.primary_only = primary_only
        self.failovers = 0
        self._primary: Any = None

    def run(
        self, commands: list[Command], wait: Wait | None, count: Callable[[float], None]
    ) -> tuple[list[Any], list[Any]]:
        """One pipeline (see `Pipelines.run`)."""
        if self.primary_only:
            commands = [("ROLE",), *commands]
        try:
            replies, acknowledged = run_on(self.client, commands, wait, count)
        finally:
            self._notice_failover()
        if self.primary_only:
            role = replies.pop(0)
            if isinstance(role, Exception) or not role or role[0] not in (b"master", "master"):
                # Connect afresh, asking the Sentinels again, next time.
                self.client.connection_pool.disconnect()
                message = (
                    f"the server the Sentinels named is not the primary (ROLE: {role!r}); a "
                    f"failover is under way"
                )
                if isinstance(role, Exception):  # what ran there, and on what, is not known
                    raise redis.ConnectionError(message)
                # A replica refuses writes (READONLY): nothing of this round trip was applied.
                raise ReadOnlyError(message)
        return replies, [(acknowledged,)] * len(replies)

    def replicas(self) -> int:
        """The primary's connected replicas."""
        self.client.ping()
        return int(self.client.info("replication").get("connected_slaves", 0))

    def eviction_policies(self) -> dict[str, str]:
        """The primary's `maxmemory-policy` (none when it refuses CONFIG GET)."""
        return eviction_policy(self.client, self.name)

    @property
    def name(self) -> str:
        """The server's address (Sentinel: the primary's, once known), for messages."""
        address = getattr(self.client.connection_pool, "master_address", None)
        if address is not None:
            return f"{address[0]}:{address[1]}"
        kwargs = self.client.connection_pool.connection_kwargs
        return str(
            kwargs.get("path") or f"{kwargs.get('host', 'the primary')}:{kwargs.get('port', '')}"
        )

    def close(self) -> None:
        """Close its connections."""
        self.client.close()

    def _notice_failover(self) -> None:
        """Count a primary that moved (Sentinel: redis-py's pool knows the primary's address)."""
        primary = getattr(self.client.connection_pool, "master_address", None)
        if primary is None or primary == self._primary:
            return
        if self._primary is not None:
            self.failovers += 1
            logger.warning("state store primary moved from %s to %s", self._primary, primary)
        self._primary = primary


class RedisStore:
    """The state store on Redis: a server a URL names (`redis://`, `rediss://`, `unix://`),
    the primary a set of Sentinels names (`redis+sentinel://`, see `sentinel_client`), or a
    Cluster (`pipelines` from `rnnserve.sessions.redis_cluster`).

    Each `read` or `write` is one pipelined round trip per server; `timeout_s` bounds
    connecting and each reply, in seconds. A round trip that fails raises StoreUnavailable; an
    operation that fails alone has a StoreUnavailable as its result. For writes whose reply was
    lost (no reply, a broken connection) that is StoreOutcomeUnknown: they may have applied.
    With `min_replicas` > 0 a write round trip waits up to `timeout_s` for that many replicas
    to acknowledge it (Redis's WAIT); when fewer do, each of its writes has a StoreUnavailable
    as its result, although the primary applied it.
    """

    shared = True

    def __init__(
        self,
        url: str,
        timeout_s: float,
        access: StoreAccess | None = None,
        min_replicas: int = 0,
        pipelines: Pipelines | None = None,
    ) -> None:
        if min_replicas < 0:
            raise ValueError(f"min_replicas must be 0 or more, got {min_replicas}")
        self.name = redact(url)
        self.min_replicas = min_replicas
        self._wait = Wait(min_replicas, max(1, round(timeout_s * 1000))) if min_replicas else None
        if pipelines is None:
            options = client_options(url, timeout_s, min_replicas, access)
            if url.startswith(SENTINEL_SCHEME):
                pipelines = OneServer(sentinel_client(url, timeout_s, **options), True)
            else:
                # A URL's own query options (socket_timeout=...) win over these defaults.
                pipelines = OneServer(redis.Redis.from_url(url, **options))
        self._pipelines = pipelines
        self._lock = threading.Lock()
        self._round_trips = [0] * (len(ROUND_TRIP_BUCKETS) + 1)
        self._round_trip_s = 0.0
        self._replication_failures = 0

    def read(self, reads: Sequence[Read]) -> list[ReadResult]:
        """GET each record, or validate it by script (`unless`); reads change nothing, so a
        read whose reply was lost is simply not done (StoreUnavailable)."""
        commands: list[Command] = []
        for op in reads:
            if op.unless:
                commands.append(("EVALSHA", _VALIDATE_SHA, 1, op.key, op.unless))
            else:
                commands.append(("GET", op.key))
        replies, _ = self._round_trip(commands, None, wrote=False)
        return [self._failure(r) if isinstance(r, Exception) else r for r in replies]

    def write(self, writes: Sequence[Write]) -> list[WriteResult]:
        """SET each record (PX: its ttl in milliseconds) or DEL it; by compare-and-set script
        when it names the stamp it `expect`s. A write whose reply was lost has
        StoreOutcomeUnknown as its result (or the round trip raises it). Raises ValueError for
        a conditional write without a record."""
        commands: list[Command] = []
        for op in writes:
            ttl_ms = max(1, round(op.ttl_s * 1000)) if op.ttl_s > 0 else 0
            if op.expect is not None:
                if op.record is None:
                    raise ValueError(f"{op.key}: a conditional write needs a record")
                commands.append(("EVALSHA", CAS_SHA, 1, op.key, op.expect, op.record, ttl_ms))
            elif op.record is None:
                commands.append(("DEL", op.key))
            elif ttl_ms:
                commands.append(("SET", op.key, op.record, "PX", ttl_ms))
            else:
                commands.append(("SET", op.key, op.record))
        replies, acknowledged = self._round_trip(commands, self._wait, wrote=True)
        failed: dict[Any, StoreUnavailable] = {}  # one error (and count) per WAIT that fell short
        results: list[WriteResult] = []
        for command, result, ack in zip(commands, replies, acknowledged, strict=True):
            if isinstance(result, Exception):
                results.append(self._failure(result, wrote=True))
            elif self._wait is not None and result is not False and not _enough(ack, self._wait):
                # Whatever the primary did, a failover may not keep it.
                if id(ack) not in failed:
                    failed[id(ack)] = self._replication_failure(ack[0])
                results.append(failed[id(ack)])
            else:
                # DEL answers how many keys it removed: none left is what was asked for too.
                results.append(True if command[0] == "DEL" else bool(result))
        return results

    def ping(self) -> None:
        """PING Redis; StoreUnavailable when it does not answer. Warns when fewer replicas
        are connected than `min_replicas` asks for."""
        try:
            replicas = self._pipelines.replicas()
        except RedisError as error:
            raise self._failure(error) from error
        if replicas < self.min_replicas:
            logger.warning(
                "state store %s has %d connected replicas, fewer than --state-min-replicas %d: "
                "every stateful step fails UNAVAILABLE until more replicas connect",
                self.name, replicas, self.min_replicas,
            )  # fmt: skip
        try:
            policies = self._pipelines.eviction_policies()
        except RedisError as error:
            raise self._failure(error) from error
        evicting = {a: p for a, p in policies.items() if p != "noeviction"}
        if evicting:
            # Every record has a TTL, so even a volatile-* policy evicts live states, and their
            # clients are told their sequences are not live.
            logger.warning(
                "state store %s evicts keys when full (maxmemory-policy %s): it may drop live "
                "sequence states, whose next requests then fail INVALID_ARGUMENT 'not live'; "
                "set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction): a "
                "full store then fails steps UNAVAILABLE and loses nothing",
                self.name, ", ".join(f"{p} on {a}" for a, p in sorted(evicting.items())),
            )  # fmt: skip

    def statistics(self) -> StoreStatistics:
        """Round trips by duration, failovers and replication failures so far."""
        with self._lock:
            return StoreStatistics(
                tuple(self._round_trips),
                self._round_trip_s,
                self._pipelines.failovers,
                self._replication_failures,
            )

    def close(self) -> None:
        """Close its connections."""
        self._pipelines.close()

    def _round_trip(
        self, commands: list[Command], wait: Wait | None, wrote: bool
    ) -> tuple[list[Any], list[Any]]:
        if not commands:
            return [], []
        try:
            return self._pipelines.run(commands, wait, self._count)
        except RedisError as error:
            raise self._failure(error, wrote) from error

    def _count(self, seconds: float) -> None:
        with self._lock:
            self._round_trips[bisect.bisect_left(ROUND_TRIP_BUCKETS, seconds)] += 1
            self._round_trip_s += seconds

    def _replication_failure(self, acknowledged: Any) -> StoreUnavailable:
        assert self._wait is not None
        with self._lock:
            self._replication_failures += 1
        found = f"{acknowledged} of" if isinstance(acknowledged, int) else f"({acknowledged}),"
        return StoreUnavailable(
            f"state store {self.name}: the state was written to the primary but only "
            f"{found} {self.min_replicas} replicas acknowledged it within "
            f"{self._wait.timeout_ms} ms (--state-min-replicas), so a failover could lose it; "
            f"send the request again with the sequence_version you sent it with: ABORTED then "
            f"means this step did take effect"
        )

    def _failure(self, error: Exception, wrote: bool = False) -> StoreUnavailable:
        """The error `error` means for a round trip (`wrote`: one of writes): for writes, a
        lost reply (no reply, or a connection error) is StoreOutcomeUnknown; an error reply
        (OOM, READONLY, a redirection not followed) means the command was not applied."""
        if isinstance(error, AuthenticationError):
            return StoreRejected(
                f"state store {self.name} refused the login: {error} (check the user in the "
                "URL and the password: --state-store-password, --state-store-password-file or "
                "the URL)"
            )
        cause = _ssl_cause(error)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return StoreRejected(
                f"state store {self.name}: its TLS certificate does not verify: "
                f"{cause.verify_message} (--state-store-ca names the CA it must chain to)"
            )
        if cause is not None:
            return StoreRejected(
                f"state store {self.name}: the TLS handshake failed: {cause.reason or cause} "
                "(a Redis that asks for client certificates needs --state-store-cert and "
                "--state-store-key)"
            )
        if wrote and not isinstance(error, ResponseError):
            # Whether an attempt reached Redis before the connection failed is not known.
            return StoreOutcomeUnknown(f"state store {self.name} is unavailable: {error}")
        return StoreUnavailable(f"state store {self.name} is unavailable: {error}")


def _ssl_cause(error: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a redis-py error, which it raises from inside its own handler."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _enough(acknowledged: tuple[Any], wait: Wait) -> bool:
    return isinstance(acknowledged[0], int) and acknowledged[0] >= wait.replicas


def client_options(
    url: str, timeout_s: float, min_replicas: int, access: StoreAccess | None
) -> dict[str, Any]:
    """redis-py connection options for a store with this timeout, replica wait and `access`.

    Raises UnusableCredentials for a file (password, CA, certificate, key) that cannot be read:
    redis-py would read it only when it first connects.
    """
    # A WAIT's reply comes when its own timeout ends: the socket must outlast it.
    return {
        "socket_timeout": timeout_s * 2 if min_replicas else timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": RetryAtOnce(timeout_s / 4),
        **_login(url, access or StoreAccess()),
    }


class RetryAtOnce(Retry):
    """redis-py's retry policy for the store: once, without backoff, and only for a connection
    that broke within `window_s` seconds of the call's start (a pooled connection that a Redis
    restart closed fails at once, and a fresh one then succeeds). Never after a timeout: a
    busy Redis would make a round trip wait twice its timeout, and every command would be sent
    twice for nothing (they are all safe to repeat, but a lost reply is for the next request
    to settle, not for a blind resend)."""

    def __init__(self, window_s: float) -> None:
        super().__init__(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
        self.window_s = window_s

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        """`do`, sent once more after a connection error within the window (see the class)."""
        started = time.monotonic()

        def early(error: Exception) -> bool:
            within = time.monotonic() - started <= self.window_s
            return within and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, early, with_failure_count)


def eviction_policy(client: redis.Redis, address: str) -> dict[str, str]:
    """`{address: maxmemory-policy}` of the server `client` reaches; empty when it refuses
    CONFIG GET (a managed Redis may); RedisError when it does not answer."""
    try:
        found: dict[Any, Any] = dict(client.config_get("maxmemory-policy"))
    except ResponseError as error:
        logger.info("state store %s: cannot check its maxmemory-policy (%s)", address, error)
        return {}
    policy = found.get("maxmemory-policy") or found.get(b"maxmemory-policy")
    if isinstance(policy, bytes):
        policy = policy.decode()
    return {address: str(policy)} if policy else {}


_TLS_FILES = {"ca": "ssl_ca_certs", "cert": "ssl_certfile", "key": "ssl_keyfile"}


def _login(url: str, access: StoreAccess) -> dict[str, Any]:
    """redis-py's connection options for `access`: the password, and TLS options for rediss://."""
    options: dict[str, Any] = {}
    password = access.password
    if access.password_file is not None:
        password = _read(access.password_file, "--state-store-password-file").decode()
        password = password.removesuffix("\n").removesuffix("\r")
    if password is not None:
        options["password"] = password
    if not url.startswith("rediss://"):
        return options
    for name, option in _TLS_FILES.items():
        path: Path | None = getattr(access, name)
        if path is not None:
            _read(path, f"--state-store-{name}")
            options[option] = str(path)
    if access.verify is Verify.NONE:
        options["ssl_cert_reqs"] = "none"
    else:
        # Said, not left to redis-py's default: before 6.0 it checked the chain but not the
        # host (a certificate of the right CA for another host was taken).
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = True
    return options


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise UnusableCredentials(f"{flag} {path}: cannot read it ({error.strerror})") from error


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
    manager = Sentinel(
        sentinels,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        sentinel_kwargs={
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "password": sentinel_password,
        },
    )
    given = options.pop("password", None)  # --state-store-password(-file), when not in the URL
    client: redis.Redis = manager.master_for(
        parts[0],
        db=db,
        username=urllib.parse.unquote(user) or None,
        password=urllib.parse.unquote(password) or given,
        **options,
    )
    return client
