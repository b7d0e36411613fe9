"""Bearer tokens: who is calling, from a token file the operator keeps (`--auth-tokens`).

The file holds one `<principal> <sha256 hex of the token>` per line (`#` starts a comment), so
the server never stores a token itself: `printf %s "$TOKEN" | sha256sum` gives the digest. A
client sends `authorization: Bearer <token>` in its call's metadata (RFC 6750, section 2.1, as
gRPC's own token credentials do). The file is read again when it changes (checked at most
once a second), so tokens are added and revoked without a restart; a rewrite that cannot be
read keeps the tokens already loaded, with a warning. A presented token's digest is compared
with every known digest in constant time (`hmac.compare_digest`), never by a lookup.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path

from rnnserve.errors import UnusableCredentials

logger = logging.getLogger(__name__)

RELOAD_CHECK_S = 1.0
"""How often, at most, the token file's stat is compared with the one loaded."""
SCHEME = "bearer "


class Refusal(enum.Enum):
    """Why a call carried no principal: the label of rnnserve_auth_failures_total."""

    MISSING = "missing"
    """No authorization metadata."""
    MALFORMED = "malformed"
    """Authorization metadata that is not `Bearer <token>`."""
    UNKNOWN = "unknown"
    """A token no line of the file names."""


class TokenFile:
    """The principals and token digests of `path`; raises UnusableCredentials (naming the file
    and line) when it cannot be read or a line is not `<principal> <64 hex digits>`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stat = _stat(path)
        self._digests = _read(path)
        self._principals = _principals(self._digests)
        self._checked = time.monotonic()

    @property
    def principals(self) -> frozenset[str]:
        """The principals the file names."""
        return self._principals

    @property
    def entries(self) -> tuple[tuple[bytes, str], ...]:
        """(SHA-256 digest of a token, its principal) for each line of the file: what the
        native transport compares presented tokens with."""
        return self._digests

    def names(self, principal: str) -> bool:
        """Whether the file (read again if it changed) still names `principal`: a call
        authenticated when it began, a stream say, goes on only while it does."""
        self._reload_if_changed()
        return principal in self._principals

    def refresh(self) -> bool:
        """Read the file again if it changed (at most once a second); whether its entries
        changed."""
        before = self._digests
        self._reload_if_changed()
        return self._digests is not before

    def principal(self, authorization: str | None) -> str | Refusal:
        """Who `authorization` (the metadata's value, or None) names, or why nobody."""
        if authorization is None:
            return Refusal.MISSING
        token = authorization[len(SCHEME) :].strip()
        if authorization[: len(SCHEME)].lower() != SCHEME or not token:
            return Refusal.MALFORMED
        self._reload_if_changed()
        presented = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for digest, principal in self._digests:  # every entry: the time does not tell which
            if hmac.compare_digest(digest, presented) and found is None:
                found = principal
        return found if found is not None else Refusal.UNKNOWN

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            if now - self._checked < RELOAD_CHECK_S:
                return
            self._checked = now
            try:
                seen = _stat(self.path)
                if seen == self._stat:
                    return
                digests = _read(self.path)
                self._digests, self._principals = digests, _principals(digests)
                self._stat = seen
            except UnusableCredentials as error:
                logger.warning("keeping the tokens loaded before: %s", error)
                return
        logger.info("auth tokens reloaded from %s: %d principals", self.path, len(self.principals))


def _principals(digests: tuple[tuple[bytes, str], ...]) -> frozenset[str]:
    return frozenset(principal for _, principal in digests)


def _stat(path: Path) -> tuple[int, int, int]:
    try:
        seen = os.stat(path)
    except OSError as error:
        raise UnusableCredentials(f"--auth-tokens {path}: {error.strerror}") from error
    return (seen.st_mtime_ns, seen.st_size, seen.st_ino)


def _read(path: Path) -> tuple[tuple[bytes, str], ...]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UnusableCredentials(f"--auth-tokens {path}: cannot read it ({error})") from error
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or len(words[1]) != 64:
            raise UnusableCredentials(
                f"--auth-tokens {path}, line {number}: expected `<principal> <sha256 hex of the "
                f"token>` (64 hex digits; printf %s TOKEN | sha256sum)"
            )
        try:
            digest = bytes.fromhex(words[1])
        except ValueError:
            raise UnusableCredentials(
                f"--auth-tokens {path}, line {number}: {words[1][:8]}... is not hexadecimal"
            ) from None
        entries.append((digest, words[0]))
    return tuple(entries)
