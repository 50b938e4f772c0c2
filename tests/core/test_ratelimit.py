"""GCRA maths with explicit `now`, descriptor keys and the IETF header values."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_ambassador.core.ratelimit import (
    EPSILON_S,
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


def test_a_leased_token_is_given_up_when_its_slot_is_due() -> None:
    # A lease of 5 from an idle bucket at t=10 (interval 1 s): the caller used the first token;
    # the others are usable until 11, 12, 13, 14, as a request without a lease would have been.
    lease = leased_after(5, 5.0, Limit(1, 1.0, 5), sent_at=10.0)
    assert lease == Leased(first_until=11.0, count=4, interval_s=1.0)
    assert lease.usable(10.0) == 4
    assert lease.take(10.0)
    assert lease.usable(12.5) == 2  # the token due at 12 is gone; 13 and 14 are left
    assert lease.take(12.5)
    assert lease.usable(12.5) == 1
    assert not lease.take(14.5)
    assert lease.count == 0


def test_a_lease_granted_behind_a_busy_bucket_lasts_until_its_later_slots() -> None:
    # The TAT was 3 s ahead: two tokens granted (slots 4 and 5 from now), the second usable
    # until 4 s from when the call went out.
    lease = leased_after(2, 5.0, Limit(1, 1.0, 5), sent_at=100.0)
    assert lease == Leased(first_until=104.0, count=1, interval_s=1.0)
    assert lease.take(104.0 + EPSILON_S / 2)
    assert not lease.take(104.0)


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
def test_leasing_processes_never_admit_more_than_rate_times_t_plus_burst_in_any_window(
    count: int, burst: int, lease: int, arrivals: list[tuple[int, float]], window_s: float
) -> None:
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
            held[process] = leased_after(granted, tat - now, limit, now)
    bound = count * window_s + burst + 1e-6
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
