"""Retry rules and maths: retryable outcomes, full-jitter backoff, Retry-After, the per-request
state and the sliding-window retry budget. Pure: every `now` and draw is given."""

from __future__ import annotations

import calendar
import math

import pytest

from resilient_ambassador.core.config import RetryConfig
from resilient_ambassador.core.errors import (
    BreakerOpen,
    ClientError,
    DeadlineExceeded,
    NoRoute,
    ProxyError,
    StaleConnection,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDNSError,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from resilient_ambassador.core.retry import (
    RETRY_AFTER_CAP_S,
    RetryBudget,
    RetryDecision,
    RetryState,
    backoff_s,
    error_retry_reason,
    parse_http_date,
    parse_retry_after,
    status_retry_reason,
)

DRAWS = [i / 64 for i in range(64)] + [0.999_999_999]
NOW = float(calendar.timegm((2026, 11, 23, 12, 0, 0, 0, 0, 0)))  # Mon, 23 Nov 2026 12:00:00 GMT

# -- which outcomes are retried ------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        UpstreamConnectError("refused"),
        UpstreamDNSError("nxdomain"),
        UpstreamTLSError("bad cert"),
        UpstreamTimeout("per-try"),
        UpstreamConnectTimeout("slow connect"),
        UpstreamProtocolError("reset before the head"),
        StaleConnection("closed by peer"),
    ],
)
def test_upstream_failures_are_retried_under_their_reason(error: UpstreamError) -> None:
    assert error_retry_reason(error) == error.reason


class _RateLimited(ProxyError):
    """Stands in for the local rate limiter's 429: a ProxyError the daemon decides itself."""

    status = 429
    reason = "rate_limited"


@pytest.mark.parametrize(
    "error",
    [
        BreakerOpen("open"),
        ClientError(413, "body_too_large", "too large"),
        _RateLimited("local quota"),
        NoRoute("no route"),
        UpstreamPoolTimeout("pool full"),  # local overload: the upstream was never contacted
        DeadlineExceeded("no time left"),
        ValueError("a bug"),
    ],
)
def test_local_decisions_and_pool_exhaustion_are_never_retried(error: Exception) -> None:
    assert error_retry_reason(error) is None


@pytest.mark.parametrize(
    ("status", "retry_after_s", "reason"),
    [
        (502, None, "status_502"),
        (503, None, "status_503"),
        (504, None, "status_504"),
        (503, 1.0, "status_503"),
        (429, 1.0, "status_429_retry_after"),
        (429, 0.0, "status_429_retry_after"),
        (429, None, None),  # a 429 without Retry-After says nothing about when: not retried
        (500, None, None),
        (500, 1.0, None),  # Retry-After only means "try later" on 429 and 503
        (200, None, None),
        (404, None, None),
    ],
)
def test_status_retry_reason(status: int, retry_after_s: float | None, reason: str | None) -> None:
    assert status_retry_reason(status, frozenset({502, 503, 504}), retry_after_s) == reason


def test_503_with_retry_after_is_retried_even_when_not_configured() -> None:
    assert status_retry_reason(503, frozenset({502}), 2.0) == "status_503_retry_after"
    assert status_retry_reason(503, frozenset({502}), None) is None


# -- backoff -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(12))
def test_backoff_is_full_jitter_below_the_capped_exponential(attempt: int) -> None:
    base_s, max_s = 0.025, 0.25
    ceiling = min(max_s, base_s * 2**attempt)
    delays = [backoff_s(attempt, base_s, max_s, draw) for draw in DRAWS]
    assert all(0.0 <= d < ceiling for d in delays)
    assert delays[0] == 0.0
    assert max(delays) == pytest.approx(ceiling)  # the whole interval is used
    assert backoff_s(attempt, base_s, max_s, 0.5) == pytest.approx(ceiling / 2)


def test_backoff_grows_exponentially_until_the_cap() -> None:
    ceilings = [backoff_s(n, 0.025, 0.25, 0.999_999_999) for n in range(6)]
    assert ceilings == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25, 0.25])


def test_backoff_of_a_huge_attempt_number_does_not_overflow() -> None:
    assert backoff_s(10_000, 0.025, 0.25, 0.5) == pytest.approx(0.125)


@pytest.mark.parametrize(("attempt", "draw"), [(-1, 0.5), (0, 1.0), (0, -0.1), (0, math.nan)])
def test_backoff_rejects_bad_arguments(attempt: int, draw: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        backoff_s(attempt, 0.025, 0.25, draw)


# -- Retry-After ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"120", 120.0),
        (b"0", 0.0),
        (b" 5 ", 5.0),
        (b"007", 7.0),
        (b"Mon, 23 Nov 2026 12:00:30 GMT", 30.0),  # IMF-fixdate
        (b"Monday, 23-Nov-26 12:01:00 GMT", 60.0),  # obsolete RFC 850 form
        (b"Mon Nov 23 12:00:10 2026", 10.0),  # obsolete asctime form
        (b"Tue Dec  1 12:00:00 2026", 8 * 86400.0),  # asctime pads a one-digit day with a space
        (b"Sun, 06 Nov 1994 08:49:37 GMT", 0.0),  # in the past: retry at once
        (b"Mon, 23 Nov 2026 11:59:59 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: bytes, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"soon",
        b"-5",  # delay-seconds is 1*DIGIT: not negative, invalid
        b"1.5",
        b"5s",
        b"+5",
        b"0x10",
        b"\xff\xfe",
        "\u0662".encode(),  # an Arabic-Indic digit is not a DIGIT
        b"Mon, 23 Nov 2026 12:00:30 UTC",  # HTTP-date is always GMT
        b"Mon, 23 Nov 2026 12:00:30 +0000",
        b"mon, 23 nov 2026 12:00:30 gmt",  # HTTP-date is case-sensitive
        b"Mon, 32 Nov 2026 12:00:30 GMT",
        b"Mon, 29 Feb 2026 12:00:30 GMT",  # 2026 is not a leap year
        b"Mon, 23 Nov 2026 24:00:00 GMT",
        b"Mon, 23 Nov 2026 12:60:00 GMT",
        b"Mon, 23 Nov 2026 12:00 GMT",
        b"23 Nov 2026 12:00:30 GMT",
        b"Mon, 23 Nov 2026 12:00:30 GMT trailing",
    ],
)
def test_parse_retry_after_rejects_invalid_values(value: bytes) -> None:
    assert parse_retry_after(value, NOW) is None


def test_an_absurdly_long_delay_is_infinite_not_an_error() -> None:
    assert parse_retry_after(b"9" * 400, NOW) == math.inf


def test_leap_second_is_accepted() -> None:
    assert parse_http_date("Wed, 31 Dec 2026 23:59:60 GMT", NOW) == calendar.timegm(
        (2026, 12, 31, 23, 59, 59, 0, 0, 0)
    )


def test_rfc850_two_digit_year_more_than_50_years_ahead_is_last_century() -> None:
    # RFC 9110 5.6.7. In 2026: "76" is 2076 (50 years ahead) but "77" is 1977.
    assert parse_http_date("Tuesday, 01-Jan-76 00:00:00 GMT", NOW) == calendar.timegm((2076, 1, 1, 0, 0, 0))
    assert parse_http_date("Saturday, 01-Jan-77 00:00:00 GMT", NOW) == calendar.timegm((1977, 1, 1, 0, 0, 0))


# -- the per-request state -------------------------------------------------------------------


def _decide(
    state: RetryState,
    now: float = 0.0,
    *,
    draw: float = 0.5,
    base_s: float = 0.1,
    retry_after_s: float | None = None,
    retry_after_cap_s: float = RETRY_AFTER_CAP_S,
) -> RetryDecision:
    return state.decide(
        now=now,
        draw=draw,
        base_s=base_s,
        max_s=1.0,
        retry_after_s=retry_after_s,
        retry_after_cap_s=retry_after_cap_s,
    )


def test_backoff_grows_with_each_increment_and_state_is_immutable() -> None:
    first = RetryState(max_retries=3)
    second = first.increment("status_503")
    third = second.increment("upstream_connect_failed")
    assert (first.retries, first.history, first.attempt) == (0, (), 1)
    assert (third.retries, third.history, third.attempt) == (2, ("status_503", "upstream_connect_failed"), 3)
    assert [_decide(s).delay_s for s in (first, second, third)] == pytest.approx([0.05, 0.1, 0.2])
    with pytest.raises(AttributeError):
        first.retries = 5  # type: ignore[misc]


def test_gives_up_when_retries_are_spent() -> None:
    state = RetryState(max_retries=1).increment("status_502")
    assert _decide(state) == RetryDecision(False, why="retries_exhausted")
    assert _decide(RetryState(max_retries=0)) == RetryDecision(False, why="retries_exhausted")


def test_never_waits_past_the_deadline() -> None:
    state = RetryState(max_retries=3, deadline=10.0)
    assert _decide(state, now=9.0, draw=0.5, base_s=1.0) == RetryDecision(True, delay_s=0.5)
    assert _decide(state, now=9.5, draw=0.5, base_s=1.0) == RetryDecision(False, why="deadline")
    assert _decide(state, now=10.0, draw=0.0) == RetryDecision(False, why="deadline")


def test_retry_after_replaces_the_backoff_within_the_time_left() -> None:
    state = RetryState(max_retries=2, deadline=10.0)
    assert _decide(state, now=1.0, retry_after_s=3.0) == RetryDecision(True, delay_s=3.0)
    assert _decide(state, now=1.0, retry_after_s=0.0) == RetryDecision(True, delay_s=0.0)


def test_retry_after_longer_than_the_time_left_gives_up_at_once() -> None:
    state = RetryState(max_retries=2, deadline=10.0)
    assert _decide(state, now=1.0, retry_after_s=9.5) == RetryDecision(False, why="retry_after_too_long")
    assert _decide(state, now=1.0, retry_after_s=9.0) == RetryDecision(False, why="deadline")


def test_retry_after_without_a_deadline_is_capped() -> None:
    state = RetryState(max_retries=2)
    assert _decide(state, retry_after_s=RETRY_AFTER_CAP_S) == RetryDecision(True, delay_s=RETRY_AFTER_CAP_S)
    too_long = _decide(state, retry_after_s=RETRY_AFTER_CAP_S + 1)
    assert too_long == RetryDecision(False, why="retry_after_too_long")
    assert _decide(state, retry_after_s=30.0, retry_after_cap_s=60.0) == RetryDecision(True, delay_s=30.0)
    assert _decide(state, retry_after_s=math.inf).retry is False


# -- the retry budget --------------------------------------------------------------------------


def _spend(budget: RetryBudget, now: float) -> int:
    """Take retries until the budget says no; how many it allowed."""
    allowed = 0
    while budget.can_retry(now):
        budget.record_retry(now)
        allowed += 1
    return allowed


def test_budget_floor_allows_min_per_s_times_window_with_no_traffic() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=3.0, window_s=10.0)
    assert _spend(budget, 5.0) == 30


def test_budget_ratio_caps_retries_at_a_share_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.1, window_s=10.0)  # floor: 1 retry
    for _ in range(100):
        budget.record_request(1.0)
    assert _spend(budget, 1.0) == 20
    for _ in range(5):
        budget.record_request(1.0)
    assert _spend(budget, 1.0) == 1  # five more requests earn one more retry


def test_budget_takes_the_larger_of_floor_and_ratio() -> None:
    budget = RetryBudget(ratio=0.5, min_per_s=1.0, window_s=4.0)  # floor: 4 retries
    for _ in range(2):
        budget.record_request(0.0)
    for _ in range(4):
        assert budget.can_retry(0.0)
        budget.record_retry(0.0)
    assert not budget.can_retry(0.0)
    for _ in range(8):
        budget.record_request(0.0)
    assert budget.can_retry(0.0)  # 4 < 0.5 * 10


def test_budget_zero_means_no_retries() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.0, window_s=10.0)
    budget.record_request(0.0)
    assert not budget.can_retry(0.0)


def test_budget_window_slides_slice_by_slice() -> None:
    budget = RetryBudget(ratio=1.0, min_per_s=0.0, window_s=10.0)  # 1 s slices
    budget.record_request(0.5)
    budget.record_retry(0.5)
    budget.record_request(3.2)
    budget.record_retry(3.2)
    assert (budget.requests(9.9), budget.retries(9.9)) == (2, 2)
    # The window is the current slice and the 9 before it: at 10.0, [0, 1) has left it.
    assert (budget.requests(10.0), budget.retries(10.0)) == (1, 1)
    assert (budget.requests(12.99), budget.retries(12.99)) == (1, 1)
    assert (budget.requests(13.0), budget.retries(13.0)) == (0, 0)


def test_budget_frees_up_once_the_storm_leaves_the_window() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10.0)
    for _ in range(10):
        budget.record_request(0.0)
    assert _spend(budget, 0.0) == 2
    assert not budget.can_retry(9.9)
    for _ in range(10):
        budget.record_request(10.5)  # the storm's slice [0, 1) has expired
    assert (budget.requests(10.5), budget.retries(10.5)) == (10, 0)
    assert _spend(budget, 10.5) == 2


def test_budget_memory_is_bounded_and_long_jumps_clear_it() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=1.0, window_s=10.0)
    for i in range(100_000):
        budget.record_request(i * 0.01)
    assert len(budget._requests) == len(budget._retries) == 10
    assert budget.requests(999.99) == 1000  # the last 10 slices of 100 requests each
    assert budget.requests(1_000_000.0) == 0


def test_budget_tolerates_a_clock_that_steps_back() -> None:
    budget = RetryBudget(ratio=1.0, min_per_s=0.0, window_s=10.0)
    budget.record_request(100.0)
    budget.record_request(50.0)  # counted in the newest slice, not lost or misplaced
    assert budget.requests(100.0) == 2


def test_budget_from_config_and_validation() -> None:
    budget = RetryBudget.from_config(
        RetryConfig(budget_ratio=0.2, budget_min_per_s=3.0, budget_window_s=10.0)
    )
    assert _spend(budget, 0.0) == 30
    with pytest.raises(ValueError, match="window_s > 0"):
        RetryBudget(ratio=0.2, min_per_s=1.0, window_s=0.0)
    with pytest.raises(ValueError, match="ratio >= 0"):
        RetryBudget(ratio=-0.1, min_per_s=1.0, window_s=1.0)
