"""The real Redis servers the tests start (the benchmark starts them the same way)."""

from rnnserve_bench.redis_servers import (
    RedisTls,
    RunningCluster,
    RunningRedis,
    RunningSentinel,
    free_port,
    start_cluster,
    start_redis,
    start_sentinel,
    wait_for_replicas,
)

__all__ = [
    "RedisTls",
    "RunningCluster",
    "RunningRedis",
    "RunningSentinel",
    "free_port",
    "start_cluster",
    "start_redis",
    "start_sentinel",
    "wait_for_replicas",
]
