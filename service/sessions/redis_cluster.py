# redis-py's cluster client has no type annotations.
# mypy: disable-error-code="no-untyped-call"
"""The Redis state store on a Redis Cluster (`redis+cluster://`): one pipeline per shard.

redis-py's cluster client keeps the slot map (which primary serves which of the 16,384 hash
slots) and the connections; this module groups a batch's commands by the primary of each key's
slot and sends each group as one pipeline, with WAIT at its end when writes must reach
replicas (WAIT counts the writes of its own connection, so it must follow them on it: redis-py's
cluster pipeline cannot do that). Every command names one key (a Lua script only its KEYS[1]),
so no command spans slots and keys need no hash tags.

Redirections (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/):
- MOVED: the slot has a new owner (a resharding finished, or a failover): the slot map is
  read again and the command sent once more, to the new owner.
- ASK: the slot is being migrated and the key is already on the target: the command is sent
  there once, after ASKING (and again after ASKING when the target lacks the scripts).
A command redirected twice fails with its own error (the store turns it into UNAVAILABLE: not
applied); one on a shard that stopped answering fails with a connection error (a write's
outcome is then unknown, see `rnnserve.sessions.redis_store`); the slot map is read again on
the next call. Resending a redirected command is safe: every command the store sends is.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
)

from rnnserve.sessions.redis_store import Command, Wait, eviction_policy, redact, run_on

logger = logging.getLogger(__name__)

CLUSTER_SCHEME = "redis+cluster://"
KEY_POSITION = {"GET": 1, "SET": 1, "DEL": 1, "EVALSHA": 3}
"""Where each command the store sends names its key."""


class ClusterPipelines:
    """The store's transport to a Redis Cluster (see the module docstring).

    `url`: `redis+cluster://[[user]:password@]host:port[,host:port...]`, any nodes of the
    cluster (the rest are discovered). Connects on first use, so a server starts while the
    cluster is down. Raises ValueError for a URL that names no node.
    """

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.name = redact(url)
        self.failovers = 0
        netloc = url.removeprefix(CLUSTER_SCHEME).partition("/")[0].partition("?")[0]
        credentials, _, hosts = netloc.rpartition("@")
        user, _, password = credentials.partition(":") if credentials else ("", "", "")
        self._nodes = []
        for host in filter(None, hosts.split(",")):
            name, _, port = host.rpartition(":")
            if not name or not port.isdigit():
                raise ValueError(
                    f"state store {self.name}: {host!r} is not host:port (expected "
                    f"redis+cluster://[:password@]host:port[,host:port...])"
                )
            self._nodes.append(ClusterNode(name, int(port)))
        if not self._nodes:
            raise ValueError(f"state store {self.name}: name at least one node, host:port")
        self._options = {
            **options,
            "username": urllib.parse.unquote(user) or None,
            # The URL's, or --state-store-password(-file)'s in `options`.
            "password": urllib.parse.unquote(password) or options.get("password"),
        }
        self._client: RedisCluster | None = None
        self._primaries: frozenset[str] = frozenset()
        self._stale = False
        self._lock = threading.Lock()

    def run(
        self, commands: list[Command], wait: Wait | None, count: Callable[[float], None]
    ) -> tuple[list[Any], list[Any]]:
        """A pipeline per primary that owns some of the keys (see `Pipelines.run`)."""
        cluster = self._cluster()
        replies: list[Any] = [None] * len(commands)
        acknowledged: list[Any] = [(None,)] * len(commands)
        groups: dict[str, list[int]] = defaultdict(list)
        nodes: dict[str, ClusterNode] = {}
        for k, command in enumerate(commands):
            try:
                node = cluster.get_node_from_key(command[KEY_POSITION[command[0]]])
            except RedisClusterException as error:  # not a RedisError: a slot map with a hole
                self._stale = True
                raise ClusterDownError(f"{error}; nothing was sent") from error
            groups[node.name].append(k)
            nodes[node.name] = node
        for name, indices in groups.items():
            self._send(cluster, nodes[name], indices, commands, wait, count, replies, acknowledged)
        self._follow_redirections(cluster, commands, wait, count, replies, acknowledged)
        return replies, acknowledged

    def replicas(self) -> int:
        """The fewest replicas any primary has connected."""
        cluster = self._cluster()
        counts = [
            int(cluster.get_redis_connection(node).info("replication").get("connected_slaves", 0))
            for node in cluster.get_primaries()
        ]
        return min(counts, default=0)

    def eviction_policies(self) -> dict[str, str]:
        """Each primary's `maxmemory-policy`, by its address."""
        cluster = self._cluster()
        policies: dict[str, str] = {}
        for node in cluster.get_primaries():
            policies.update(eviction_policy(cluster.get_redis_connection(node), node.name))
        return policies

    def close(self) -> None:
        """Close every connection."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _cluster(self) -> RedisCluster:
        with self._lock:
            if self._client is None:
                try:
                    self._client = RedisCluster(startup_nodes=self._nodes, **self._options)
                except RedisClusterException as error:  # none reachable: not a RedisError
                    raise ClusterDownError(f"{error}; nothing was sent") from error
                self._primaries = self._primary_names(self._client)
            elif self._stale:
                self._stale = False
                self._refresh(self._client)
            return self._client

    def _refresh(self, cluster: RedisCluster) -> None:
        """Read the slot map again; count a failover when the set of primaries changed."""
        try:
            cluster.nodes_manager.initialize()
        except RedisError as error:
            self._stale = True
            logger.warning("state store %s: reading the slot map failed: %s", self.name, error)
            return
        primaries = self._primary_names(cluster)
        if primaries != self._primaries:
            gone = ", ".join(sorted(self._primaries - primaries)) or "none"
            logger.warning(
                "state store %s: primaries changed (gone: %s; now %s)",
                self.name, gone, ", ".join(sorted(primaries)),
            )  # fmt: skip
            if self._primaries - primaries:
                self.failovers += 1
            self._primaries = primaries

    @staticmethod
    def _primary_names(cluster: RedisCluster) -> frozenset[str]:
        return frozenset(node.name for node in cluster.get_primaries())

    def _send(
        self,
        cluster: RedisCluster,
        node: ClusterNode,
        indices: list[int],
        commands: list[Command],
        wait: Wait | None,
        count: Callable[[float], None],
        replies: list[Any],
        acknowledged: list[Any],
        asking: bool = False,
    ) -> None:
        """One pipeline to `node` with the commands at `indices`; their replies in place."""
        batch = [commands[k] for k in indices]
        try:
            client = cluster.get_redis_connection(node)
            got, ack = run_on(client, batch, wait, count, asking)
        except RedisError as error:  # this shard alone: the others' replies stand
            self._stale = True
            got, ack = [error] * len(batch), None
        shared = (ack,)
        for k, reply in zip(indices, got, strict=True):
            replies[k] = reply
            acknowledged[k] = shared
            if isinstance(reply, ClusterDownError):
                self._stale = True

    def _follow_redirections(
        self,
        cluster: RedisCluster,
        commands: list[Command],
        wait: Wait | None,
        count: Callable[[float], None],
        replies: list[Any],
        acknowledged: list[Any],
    ) -> None:
        """Send each MOVED command to its slot's new owner, each ASK one to the target, once."""
        moved = [k for k, r in enumerate(replies) if isinstance(r, MovedError)]
        asked = [k for k, r in enumerate(replies) if type(r) is AskError]
        if moved:
            with self._lock:
                self._refresh(cluster)
        targets: dict[tuple[str, int, bool], list[int]] = defaultdict(list)
        for k in moved + asked:
            host, port = replies[k].node_addr
            targets[host, port, k in asked].append(k)
        for (host, port, asking), indices in targets.items():
            node = cluster.get_node(host=host, port=port) or ClusterNode(host, port)
            self._send(cluster, node, indices, commands, wait, count, replies, acknowledged, asking)
