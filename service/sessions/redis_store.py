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
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoScriptError, RedisError
from redis.retry import Retry

from rnnserve.errors import StoreRejected, StoreUnavailable, UnusableCredentials
from rnnserve.sessions.store import (
    STAMP_OFFSET,
    STAMP_SIZE,
    Read,
    ReadResult,
    StoreAccess,
    Verify,
    Write,
    WriteResult,
)

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
    """The state store on a Redis server a URL names (`redis://`, `rediss://`, `unix://`).

    Each `read` or `write` is one pipelined round trip; `timeout_s` bounds connecting and
    each reply, in seconds. A round trip that fails raises StoreUnavailable; an operation that
    fails alone has a StoreUnavailable as its result.
    """

    shared = True

    def __init__(self, url: str, timeout_s: float, access: StoreAccess | None = None) -> None:
        self.name = redact(url)
        # A URL's own query options (socket_timeout=..., ssl_ca_certs=...) win over these
        # defaults. One retry without backoff: a pooled connection broken by a Redis restart
        # reconnects at once, while a Redis that is down fails fast, as UNAVAILABLE.
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            **_login(url, access or StoreAccess()),
        )

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
        results: list[WriteResult] = []
        for command, result in zip(commands, self._round_trip(commands), strict=True):
            if isinstance(result, Exception):
                results.append(self._failure(result))
            else:
                # DEL answers how many keys it removed: none left is what was asked for too.
                results.append(True if command[0] == "DEL" else bool(result))
        return results

    def ping(self) -> None:
        """PING Redis; StoreUnavailable when it does not answer."""
        try:
            self._redis.ping()
        except RedisError as error:
            raise self._failure(error) from error

    def close(self) -> None:
        """Close its connections."""
        self._redis.close()

    def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if not commands:
            return []
        results = self._pipeline(commands)
        unknown = [k for k, r in enumerate(results) if isinstance(r, NoScriptError)]
        if unknown:
            try:
                for source in _SCRIPTS.values():
                    self._redis.script_load(source)
            except RedisError as error:
                raise self._failure(error) from error
            again = self._pipeline([commands[k] for k in unknown])
            for k, result in zip(unknown, again, strict=True):
                results[k] = result
        return results

    def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            pipe = self._redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            return pipe.execute(raise_on_error=False)
        except RedisError as error:
            raise self._failure(error) from error

    def _failure(self, error: Exception) -> StoreUnavailable:
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
        return StoreUnavailable(f"state store {self.name} is unavailable: {error}")


def _ssl_cause(error: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a redis-py error, which it raises from inside its own handler."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_TLS_FILES = {"ca": "ssl_ca_certs", "cert": "ssl_certfile", "key": "ssl_keyfile"}


def _login(url: str, access: StoreAccess) -> dict[str, Any]:
    """redis-py's connection options for `access`: the password, and TLS options for rediss://.

    Raises UnusableCredentials for a file (password, CA, certificate, key) that cannot be read:
    redis-py would read it only when it first connects.
    """
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
    return options


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise UnusableCredentials(f"{flag} {path}: cannot read it ({error.strerror})") from error
