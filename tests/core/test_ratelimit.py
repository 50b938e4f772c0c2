"""GCRA maths with explicit `now`, descriptor keys and the IETF header values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_ambassador.core.ratelimit import (
    EPSILON_S,
    LEASE_TTL_S,
    Leased,
    Limit,
    default_burst,
    descriptor_key,
    gcra,
    leased_after,
    policy_header,
    ratelimit_header,
)

TEN_PER_S = Limit(10, 1.0, 10)


def run(limit: Limit, times: list[float], max_wait_s: float = 0.0) -> list[bool]:
    tat = -math.inf
    out = []
    for now in times:
        decision, tat = gcra(tat, now, limit, max_wait_s)
        out.append(decision.allowed)
    return out


def test_a_full_bucket_admits_the_burst_at_once_then_one_per_interval() -> None:
    assert run(TEN_PER_S, [0.0] * 11) == [True] * 10 + [False]
    # 0.1 s later exactly one token is back.
    assert run(TEN_PER_S, [0.0] * 10 + [0.1, 0.1]) == [True] * 11 + [False]


def test_remaining_reset_and_retry_after() -> None:
    limit = Limit(10, 1.0, 5)
    tat = -math.inf
    first, tat = gcra(tat, 100.0, limit)
    assert (first.allowed, first.remaining) == (True, 4)
    assert first.reset_s == pytest.approx(0.1)
    for _ in range(4):
        decision, tat = gcra(tat, 100.0, limit)
    assert decision.remaining == 0
    assert decision.reset_s == pytest.approx(0.5)
    refused, same_tat = gcra(tat, 100.0, limit)
    assert not refused.allowed
    assert same_tat == tat  # a refusal takes nothing
    assert refused.retry_after_s == pytest.approx(0.1)
    assert refused.reset_s == pytest.approx(0.5)


def test_an_idle_bucket_refills_to_the_burst_and_no_further() -> None:
    tat = -math.inf
    for _ in range(10):
        _, tat = gcra(tat, 0.0, TEN_PER_S)
    decision, _ = gcra(tat, 60.0, TEN_PER_S)
    assert decision.remaining == 9


def test_queue_reserves_slots_in_order_up_to_max_wait() -> None:
    limit = Limit(10, 1.0, 1)
    tat = -math.inf
    waits = []
    for _ in range(4):
        decision, tat = gcra(tat, 0.0, limit, max_wait_s=0.25)
        waits.append(decision.wait_s if decision.allowed else None)
    assert waits == [0.0, pytest.approx(0.1), pytest.approx(0.2), None]


def test_scaled_share_for_local_fallback() -> None:
    share = Limit(50, 1.0, 50).scaled(1 / 4)
    assert (share.count, share.burst) == (12.5, 12)
    assert Limit(1, 1.0, 1).scaled(1 / 4).burst == 1


@pytest.mark.parametrize(
    ("count", "period_s", "burst"), [(10, 1, 10), (600, 60, 10), (10000, 3600, 3), (1, 60, 1), (2.5, 1, 3)]
)
def test_default_burst_is_one_seconds_worth(count: float, period_s: float, burst: int) -> None:
    assert default_burst(count, period_s) == burst


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 50),
    period_s=st.sampled_from([0.5, 1.0, 10.0]),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 0.3, allow_nan=False), min_size=1, max_size=200),
    window_s=st.floats(0.01, 5.0),
    max_wait_s=st.sampled_from([0.0, 0.5]),
)
def test_never_more_than_rate_times_t_plus_burst_in_any_window(
    count: int, period_s: float, burst: int, gaps: list[float], window_s: float, max_wait_s: float
) -> None:
    limit = Limit(count, period_s, burst)
    now, tat = 0.0, -math.inf
    starts: list[float] = []  # when each admitted request may go (its reserved slot)
    for gap in gaps:
        now += gap
        decision, tat = gcra(tat, now, limit, max_wait_s)
        if decision.allowed:
            starts.append(now + decision.wait_s)
    starts.sort()
    bound = count / period_s * window_s + burst + 1e-6
    end = 0
    for i, first in enumerate(starts):  # every window that starts at an admitted request
        while end < len(starts) and starts[end] <= first + window_s:
            end += 1
        assert end - i <= bound


# -- leases -------------------------------------------------------------------------------------


def lease_script(tat: float, now: float, limit: Limit, want: int) -> tuple[int, float]:
    """The Redis script's maths for a reject-mode lease (stores.ratelimit.GCRA_LUA): tokens
    granted and the new TAT. The Redis tests run the script itself; this model lets the
    window property below run thousands of sequences."""
    interval = limit.interval_s
    base = max(tat, now)
    if base + interval - limit.burst * interval - now > EPSILON_S:
        return 0, tat
    fit = math.floor((now + EPSILON_S + limit.burst * interval - base) / interval)
    granted = max(1, min(want, fit))
    return granted, base + granted * interval


def test_leased_tokens_last_the_lease_ttl_from_when_it_was_asked() -> None:
    lease = leased_after(5, sent_at=10.0)
    assert lease == Leased(until=10.0 + LEASE_TTL_S, count=4)
    assert lease.usable(10.0) == 4
    assert lease.take(10.0)
    assert lease.take(10.0 + LEASE_TTL_S / 2)
    assert lease.usable(10.0 + LEASE_TTL_S / 2) == 2
    assert not lease.take(10.0 + LEASE_TTL_S)  # expired: the rest is given up
    assert lease.count == 0


def test_a_lease_of_one_token_holds_nothing() -> None:
    lease = leased_after(1, sent_at=0.0)
    assert lease.usable(0.0) == 0
    assert not lease.take(0.0)


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(1, 50),
    burst=st.integers(1, 20),
    lease=st.integers(1, 20),
    arrivals=st.lists(
        st.tuples(st.integers(0, 3), st.floats(0, 0.3, allow_nan=False)), min_size=1, max_size=300
    ),
    window_s=st.floats(0.01, 5.0),
)
def test_leasing_processes_admit_at_most_the_leases_held_beyond_rate_times_t_plus_burst(
    count: int, burst: int, lease: int, arrivals: list[tuple[int, float]], window_s: float
) -> None:
    """In any window: what the bucket allows (rate x t + burst), plus at most the tokens the
    four processes held when it opened, (lease - 1) each."""
    limit = Limit(count, 1.0, burst)
    want = min(lease, burst)
    now, tat = 0.0, -math.inf
    held: dict[int, Leased] = {}
    admitted: list[float] = []
    for process, gap in arrivals:
        now += gap
        lease_here = held.get(process)
        if lease_here is not None and lease_here.take(now):
            admitted.append(now)
            continue
        granted, tat = lease_script(tat, now, limit, want)
        if granted:
            admitted.append(now)
            held[process] = leased_after(granted, now)
    bound = count * window_s + burst + 4 * (want - 1) + 1e-6
    end = 0
    for i, first in enumerate(admitted):
        while end < len(admitted) and admitted[end] <= first + window_s:
            end += 1
        assert end - i <= bound


def test_descriptor_keys_are_hashes_separated_by_kind_and_scope() -> None:
    a = descriptor_key("client_ip", "route-a", b"10.0.0.1")
    assert len(a) == 32
    assert "10.0.0.1" not in a
    assert a != descriptor_key("client_ip", "route-b", b"10.0.0.1")
    assert a != descriptor_key("header", "route-a", b"10.0.0.1")
    assert a == descriptor_key("client_ip", "route-a", b"10.0.0.1")
    hostile = descriptor_key("header", "r", b"*\r\n" + b"x" * 100_000)
    assert len(hostile) == 32


def test_ietf_header_values() -> None:
    assert policy_header("api", Limit(10, 1.0, 10)) == b'"api";q=10;w=1'
    assert policy_header("api", Limit(600, 60.0, 10)) == b'"api";q=600;w=60'
    assert policy_header("api", Limit(5, 0.5, 5)) == b'"api";q=10;w=1'
    _, tat = gcra(-math.inf, 0.0, Limit(10, 1.0, 1))
    refused, _ = gcra(tat, 0.0, Limit(10, 1.0, 1))
    assert ratelimit_header("api", refused) == b'"api";r=0;t=1'
    assert policy_header('we"ird\\', Limit(1, 1.0, 1)) == b'"we\\"ird\\\\";q=1;w=1'
