"""The server's listeners (the gRPC port, the metrics endpoint) and why one cannot be bound.

A port another process holds is the commonest reason a server does not start. Whatever refused
the address (the native transport, grpc.aio or the metrics endpoint's HTTP server), the
operator gets one line that names the address and port, says what is wrong, and names the flag
and environment variable that change it.
"""

from __future__ import annotations

import errno
import os
import re
import socket
from dataclasses import dataclass

from rnnserve.config import setting_source
from rnnserve.errors import CannotListen


@dataclass(frozen=True)
class Listener:
    """One address the server listens on, and the settings that choose it."""

    what: str
    """What listens there, as a message names it: "gRPC", "metrics (/metrics)"."""
    host: str
    port: int
    host_setting: str
    """The Settings field that sets the host ("host", "metrics_host")."""
    port_setting: str
    """The Settings field that sets the port ("grpc_port", "metrics_port")."""
    port_hint: str = "0 picks a free one"
    """What else the port setting takes, for the message."""

    @property
    def address(self) -> str:
        """host:port, an IPv6 host in brackets."""
        bare = self.host.strip("[]")
        return f"[{bare}]:{self.port}" if ":" in bare else f"{bare}:{self.port}"


_OS_ERROR = re.compile(r"os error (\d+)")
"""How Rust's io::Error shows its errno (the native transport's bind error)."""


def bind_errno(host: str, port: int) -> int | None:
    """The errno a listening socket on `host`:`port` fails with now, as the transports bind
    (SO_REUSEADDR); None when one could listen there. A host that does not resolve counts as
    EADDRNOTAVAIL (not an address of this machine)."""
    bare = host.strip("[]")
    try:
        candidates = socket.getaddrinfo(
            bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    failed: int | None = None
    for family, kind, protocol, _, address in candidates:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                probe.listen()
            except OSError as error:
                failed = error.errno
                continue
        return None
    return failed


def check(listener: Listener) -> None:
    """Raise CannotListen if `listener`'s address cannot be listened on now (another process
    holds the port, the host is not this machine's, the port needs privileges). Port 0 (any
    free port) always can."""
    if listener.port == 0:
        return
    code = bind_errno(listener.host, listener.port)
    if code is not None:
        raise cannot_listen(listener, code)


def cannot_listen(listener: Listener, cause: OSError | int | None) -> CannotListen:
    """The error for `listener`'s address refused with `cause`: an OSError (its errno, or one
    shown in its message as Rust shows it), an errno, or None (unknown: the address is probed
    again to learn why)."""
    code = cause if isinstance(cause, int) else None
    if isinstance(cause, OSError):
        code = cause.errno
        if code is None and (shown := _OS_ERROR.search(str(cause))):
            code = int(shown.group(1))
    if code is None:
        code = bind_errno(listener.host, listener.port)
    port = setting_source(listener.port_setting)
    host = setting_source(listener.host_setting)
    where = f"cannot listen for {listener.what} on {listener.address}"
    if code == errno.EADDRINUSE:
        why = (
            f"port {listener.port} is in use (another process, or another rnnserve, listens "
            f"there); stop it, or choose another port with {port} ({listener.port_hint})"
        )
    elif code == errno.EACCES:
        why = (
            f"port {listener.port} needs privileges this process lacks (ports below 1024); "
            f"choose a port of 1024 or more with {port}"
        )
    elif code in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        why = (
            f"{listener.host} is not an address of this machine; choose one of its addresses "
            f"with {host} (0.0.0.0: every interface)"
        )
    else:
        reason = os.strerror(code) if code else str(cause or "reason unknown")
        why = f"{reason}; {port} moves the port, {host} the address"
    return CannotListen(f"{where}: {why}")
