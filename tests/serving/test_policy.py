"""The policy's rules in-process, on a clock the test moves: token buckets, sequence counts by
principal, request bytes, and admin calls."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rnnserve.errors import LimitExceeded, PermissionDenied
from rnnserve.serving.policy import Policy, PolicySettings, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def refused_limit(call) -> str:
    with pytest.raises(LimitExceeded) as refused:
        call()
    return refused.value.limit


@given(
    rate=st.floats(0.5, 50),
    capacity=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=60),
)
def test_a_token_bucket_admits_at_most_its_capacity_plus_rate_times_time(
    rate: float, capacity: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, capacity, 0.0)
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        wait = bucket.take(now)
        if wait == 0.0:
            admitted += 1
        else:
            assert 0 < wait <= 1 / rate + 1e-9  # the wait it names is right: a token by then
            assert bucket.take(now + wait + 1e-9) == 0.0
            admitted += 1
            now += wait + 1e-9
    assert admitted <= capacity + rate * now + 1e-6


def test_each_principal_has_its_own_bucket_and_the_server_one_for_all() -> None:
    clock = Clock()
    policy = Policy(
        PolicySettings(principal_requests_per_s=1.0, principal_burst=3, max_requests_per_s=5),
        clock,
    )
    for _ in range(3):
        policy.admit("alice", 10)
    assert refused_limit(lambda: policy.admit("alice", 10)) == "principal_rate"
    policy.admit("bob", 10)  # bob's bucket is his own
    policy.admit("carol", 10)  # the server's five: 3 alice, bob, carol
    assert refused_limit(lambda: policy.admit("dave", 10)) == "server_rate"
    clock.now += 1.0  # one second: one token more for each principal, five for the server
    policy.admit("alice", 10)
    assert refused_limit(lambda: policy.admit("alice", 10)) == "principal_rate"


def test_request_bytes_are_checked_before_any_rate() -> None:
    policy = Policy(PolicySettings(max_request_bytes=1000, principal_requests_per_s=1.0))
    assert refused_limit(lambda: policy.admit("alice", 1001)) == "request_bytes"
    policy.admit("alice", 1000)  # the refused one took no token


def test_live_sequences_are_counted_by_principal_and_for_the_server() -> None:
    policy = Policy(PolicySettings(principal_max_sequences=2, max_live_sequences=3))
    policy.acquire_sequence("alice")
    policy.acquire_sequence("alice")
    assert refused_limit(lambda: policy.acquire_sequence("alice")) == "principal_sequences"
    policy.acquire_sequence("bob")
    assert refused_limit(lambda: policy.acquire_sequence("carol")) == "server_sequences"
    policy.release_sequence("alice")
    policy.acquire_sequence("carol")
    assert policy.live_sequences("alice") == 1 and policy.live_sequences("carol") == 1


def test_admin_calls_need_an_admin_only_when_callers_authenticate() -> None:
    Policy(PolicySettings()).require_admin("")
    policy = Policy(PolicySettings(authenticated=True, admins=frozenset({"root"})))
    policy.require_admin("root")
    with pytest.raises(PermissionDenied, match="--auth-admins"):
        policy.require_admin("alice")


def test_a_rate_refusal_tells_the_client_library_when_to_retry() -> None:
    import grpc

    from rnnserve.client.errors import ResourceExhausted, error_for

    clock = Clock()
    policy = Policy(PolicySettings(principal_requests_per_s=4.0, principal_burst=1), clock)
    policy.admit("alice", 1)
    clock.now += 0.1  # 0.4 of a token back: the next one in 0.15 s
    with pytest.raises(LimitExceeded) as refused:
        policy.admit("alice", 1)
    error = error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, str(refused.value))
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after_s == pytest.approx(0.15, abs=1e-3)
