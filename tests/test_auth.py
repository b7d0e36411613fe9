"""The token file (`rnnserve.auth.TokenFile`) read again when a Kubernetes Secret volume changes.

The kubelet never rewrites a mounted Secret's file: it writes the new files into a fresh
timestamped folder, points a `..data.tmp` link at it, renames that over `..data`, and removes the
old folder; the file the server was given is a link `tokens -> ..data/tokens` that never
changes itself. The reload must follow the links (`os.stat`, not `os.lstat`) to see it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from rnnserve import auth
from rnnserve.auth import Refusal, TokenFile


def line(principal: str, token: str) -> str:
    return f"{principal} {hashlib.sha256(token.encode()).hexdigest()}\n"


def publish(volume: Path, version: str, text: str) -> None:
    """Write `tokens` into `volume` as the kubelet's atomic writer updates a Secret volume."""
    folder = volume / f"..{version}"
    folder.mkdir()
    (folder / "tokens").write_text(text)
    (folder / "tokens").chmod(0o440)
    previous = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    (volume / "..data.tmp").symlink_to(folder.name)
    os.rename(volume / "..data.tmp", volume / "..data")  # the swap: one atomic rename
    if not (volume / "tokens").is_symlink():
        (volume / "tokens").symlink_to("..data/tokens")
    if previous is not None:
        for old in (volume / previous).iterdir():
            old.unlink()
        (volume / previous).rmdir()


@pytest.fixture
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call checks the file's stat (the server checks at most once a second)."""
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)


def test_a_secret_volumes_symlink_swap_is_read(tmp_path: Path, no_wait: None) -> None:
    publish(tmp_path, "2026_01_01_00_00_00.1", line("alice", "alice-token"))
    tokens = TokenFile(tmp_path / "tokens")
    assert tokens.principal("Bearer alice-token") == "alice"
    link_before = os.lstat(tmp_path / "tokens")

    # Same length, so only the target's identity and time tell the files apart.
    publish(tmp_path, "2026_01_01_00_01_00.2", line("bobby", "bobby-token"))
    assert os.lstat(tmp_path / "tokens") == link_before  # the link itself did not change
    assert tokens.principal("Bearer bobby-token") == "bobby"
    assert tokens.principal("Bearer alice-token") is Refusal.UNKNOWN
    assert tokens.principals == {"bobby"}


def test_a_swap_to_a_file_that_cannot_be_used_keeps_the_tokens(
    tmp_path: Path, no_wait: None
) -> None:
    publish(tmp_path, "1", line("alice", "alice-token"))
    tokens = TokenFile(tmp_path / "tokens")
    publish(tmp_path, "2", "alice not-a-digest\n")
    assert tokens.principal("Bearer alice-token") == "alice"
    publish(tmp_path, "3", line("alice", "alice-token") + line("carol", "carol-token"))
    assert tokens.principal("Bearer carol-token") == "carol"
