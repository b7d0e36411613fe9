"""The Redis store over TLS with a password or an ACL user, against Debian's redis-server on a
TLS-only port: what logs in, and what is refused at once with a message that says why."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rnnserve.errors import StoreRejected, StoreUnavailable, UnusableCredentials
from rnnserve.sessions.connect import open_store
from rnnserve.sessions.redis_store import RedisStore
from rnnserve.sessions.store import Read, StoreAccess, Verify, Write
from tests.certs import Authority
from tests.redis_server import RedisTls, RunningRedis, start_redis

PASSWORD = "s3cret:/@ word"
"""The default user's; characters a URL would need escaped, which a variable or file does not."""
ACL = ("--user", "rnnserve", "on", ">acl-pass", "~rnnserve:*", "&*", "+@all")
"""An ACL user limited to the store's keys, beside the default user (which has PASSWORD)."""


@dataclass(frozen=True)
class Pki:
    ca: Authority
    other: Authority
    tls: RedisTls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("redis-pki")
    ca = Authority("redis-ca", folder / "ca")
    server = ca.issue("redis")
    return Pki(
        ca, Authority("other-ca", folder / "other"), RedisTls(server.cert, server.key, ca.path)
    )


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRedis]:
    running = start_redis(
        tmp_path_factory.mktemp("redis-tls"), "--requirepass", PASSWORD, *ACL, tls=pki.tls
    )
    yield running
    running.stop()


def round_trip(store: RedisStore | object) -> None:
    key = f"rnnserve:tls:{uuid.uuid4().hex}"
    assert store.write([Write(key, b"state")]) == [True]  # type: ignore[attr-defined]
    assert store.read([Read(key)]) == [b"state"]  # type: ignore[attr-defined]


def url_with(running: RunningRedis, userinfo: str) -> str:
    return running.url.replace("rediss://", f"rediss://{userinfo}@")


def test_tls_with_the_password_in_the_url_a_variable_a_file_or_an_acl_user(
    tls_redis, pki, tmp_path
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")  # as `echo` or a Secret editor leaves it
    escaped = PASSWORD.replace("%", "%25").replace(":", "%3A").replace("/", "%2F")
    escaped = escaped.replace("@", "%40").replace(" ", "%20")
    logins = [
        (url_with(tls_redis, f":{escaped}"), StoreAccess(ca=pki.ca.path)),
        (tls_redis.url, StoreAccess(password=PASSWORD, ca=pki.ca.path)),
        (tls_redis.url, StoreAccess(password_file=password_file, ca=pki.ca.path)),
        (url_with(tls_redis, "rnnserve"), StoreAccess(password="acl-pass", ca=pki.ca.path)),
        (url_with(tls_redis, "rnnserve:acl-pass"), StoreAccess(ca=pki.ca.path)),
    ]
    for url, access in logins:
        store = open_store(url, 2.0, access)
        try:
            store.ping()
            round_trip(store)
        finally:
            store.close()
    stored = tls_redis.client(username="rnnserve", password="acl-pass").keys("rnnserve:tls:*")
    assert len(stored) == len(logins)


@pytest.mark.parametrize(
    ("userinfo", "password"),
    [("", "guess"), ("", None), ("rnnserve", "guess"), ("nobody", PASSWORD)],
    ids=["wrong-password", "no-password", "wrong-acl-password", "unknown-user"],
)
def test_a_login_redis_refuses_is_rejected_at_once(tls_redis, pki, userinfo, password) -> None:
    url = url_with(tls_redis, userinfo) if userinfo else tls_redis.url
    store = RedisStore(url, 2.0, StoreAccess(password=password, ca=pki.ca.path))
    started = time.monotonic()
    with pytest.raises(StoreRejected, match="refused the login") as caught:
        store.ping()
    assert time.monotonic() - started < 2.0  # less than the store's timeout: nothing waited
    assert PASSWORD not in str(caught.value) and "guess" not in str(caught.value)
    with pytest.raises(StoreRejected):  # a request is refused the same way, as UNAVAILABLE
        store.read([Read("rnnserve:tls:any")])
    store.close()


def test_a_server_certificate_that_does_not_verify_is_rejected(tls_redis, pki, tmp_path) -> None:
    untrusted = [
        (tls_redis.url, StoreAccess(password=PASSWORD, ca=pki.other.path)),  # another CA
        (tls_redis.url, StoreAccess(password=PASSWORD)),  # the system's CAs
    ]
    for url, access in untrusted:
        store = RedisStore(url, 2.0, access)
        with pytest.raises(StoreRejected, match="TLS certificate does not verify"):
            store.ping()
        store.close()
    # A certificate from the right CA, for another host than the URL's.
    elsewhere = pki.ca.issue("elsewhere", hosts=("redis.example",))
    running = start_redis(tmp_path, tls=RedisTls(elsewhere.cert, elsewhere.key, pki.ca.path))
    try:
        store = RedisStore(running.url, 2.0, StoreAccess(ca=pki.ca.path))
        with pytest.raises(StoreRejected, match="does not verify: .*mismatch"):
            store.ping()
        store.close()
    finally:
        running.stop()
    # The spelled-out opt-out: encrypted, but any certificate is taken.
    trusting = RedisStore(tls_redis.url, 2.0, StoreAccess(password=PASSWORD, verify=Verify.NONE))
    round_trip(trusting)
    trusting.close()


def test_a_redis_that_asks_for_client_certificates(pki, tmp_path) -> None:
    client = pki.ca.issue("rnnserve-client", client=True)
    tls = RedisTls(pki.tls.cert, pki.tls.key, pki.ca.path, client=(client.cert, client.key))
    running = start_redis(tmp_path / "redis", tls=tls)
    try:
        without = RedisStore(running.url, 2.0, StoreAccess(ca=pki.ca.path))
        with pytest.raises(StoreRejected, match="TLS handshake failed.*--state-store-cert"):
            without.ping()
        without.close()
        other = pki.other.issue("stranger", client=True)
        access = StoreAccess(ca=pki.ca.path, cert=other.cert, key=other.key)
        stranger = RedisStore(running.url, 2.0, access)
        with pytest.raises(StoreRejected):
            stranger.ping()
        stranger.close()
        access = StoreAccess(ca=pki.ca.path, cert=client.cert, key=client.key)
        with_certificate = RedisStore(running.url, 2.0, access)
        round_trip(with_certificate)
        with_certificate.close()
    finally:
        running.stop()


def test_a_plain_client_on_the_tls_port_is_unavailable_not_hung(tls_redis) -> None:
    plain = RedisStore(tls_redis.url.replace("rediss://", "redis://"), 1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        plain.ping()
    assert time.monotonic() - started < 3.0
    plain.close()


def test_files_that_cannot_be_read_are_named(tls_redis, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    for access, flag in [
        (StoreAccess(ca=missing), "--state-store-ca"),
        (StoreAccess(password_file=missing), "--state-store-password-file"),
    ]:
        with pytest.raises(UnusableCredentials, match=f"{flag} {missing}: cannot read it"):
            RedisStore(tls_redis.url, 2.0, access)
