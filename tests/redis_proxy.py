"""A TCP proxy on loopback in front of a real Redis, for faults Redis itself cannot be asked for.

- `lose_replies`: the next commands that match are forwarded, run by Redis, and then the
  client's connection is closed before their reply reaches it, as a network, a load balancer or
  a dying node can do: the client cannot know whether the command ran.
- `retarget`: later connections go to another Redis and the open ones are closed, as when a
  virtual IP or a DNS name moves to another server in a failover.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable

Match = Callable[[bytes], bool]


class RedisProxy:
    """Forwards 127.0.0.1:`port` to the Redis on 127.0.0.1:`upstream`, until `close`."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._rules: list[list] = []  # [match, times left]
        self._open: set[socket.socket] = set()
        self.lost = 0
        """Replies lost so far."""
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def lose_replies(self, match: Match, times: int = 1) -> None:
        """Lose the replies of the next `times` client writes (each a command or a pipeline)
        for which `match(bytes sent)` is true, once Redis ran them."""
        with self._lock:
            self._rules.append([match, times])

    def retarget(self, upstream: int) -> None:
        """Send new connections to the Redis on `upstream`; close every open one."""
        with self._lock:
            self.upstream = upstream
            doomed = list(self._open)
        for sock in doomed:
            _close(sock)

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.retarget(self.upstream)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                upstream = self.upstream
            try:
                server = socket.create_connection(("127.0.0.1", upstream), timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open.update((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _losing(self, data: bytes) -> bool:
        with self._lock:
            for rule in self._rules:
                if rule[1] > 0 and rule[0](data):
                    rule[1] -= 1
                    self.lost += 1
                    return True
        return False

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ)
        selector.register(server, selectors.EVENT_READ)
        server.settimeout(None)
        losing = False  # a reply to lose is on its way: the rest of its command still goes on
        try:
            while True:
                for key, _ in selector.select():
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(1 << 16)
                    if not data:
                        return
                    if source is client:
                        losing = losing or self._losing(data)
                        server.sendall(data)
                    elif losing:  # Redis ran (at least the first of) it: lose the reply
                        time.sleep(0.005)  # and let it run the rest of a pipeline
                        return
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            with self._lock:
                self._open.difference_update((client, server))
            _close(client)
            _close(server)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
