"""Reading upstream quota headers, and the pause/pacing decisions they lead to."""

from __future__ import annotations

import pytest

from resilient_ambassador.core.quota import (
    DEFAULT_PAUSE_S,
    MAX_PAUSE_S,
    QuotaObservation,
    QuotaState,
    read_quota,
)

EPOCH = 1_800_000_000.0


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(n.lower().encode(), v.encode()) for n, v in pairs]


def test_nothing_announced() -> None:
    assert read_quota(200, h(("content-type", "text/plain")), EPOCH) is None


def test_ietf_fields_most_restrictive_policy_wins() -> None:
    obs = read_quota(
        200,
        h(
            ("RateLimit", '"hour";r=500;t=1200, "minute";r=3;t=20'),
            ("RateLimit-Policy", '"hour";q=1000;w=3600, "minute";q=60;w=60'),
        ),
        EPOCH,
    )
    assert obs == QuotaObservation(limit=60, remaining=3, reset_s=20.0)


@pytest.mark.parametrize("prefix", ["X-RateLimit-", "RateLimit-"])
def test_x_ratelimit_reset_as_seconds_or_epoch(prefix: str) -> None:
    delta = read_quota(
        200, h((prefix + "Limit", "100"), (prefix + "Remaining", "7"), (prefix + "Reset", "30")), EPOCH
    )
    epoch = read_quota(200, h((prefix + "Remaining", "7"), (prefix + "Reset", str(int(EPOCH) + 45))), EPOCH)
    assert delta == QuotaObservation(limit=100, remaining=7, reset_s=30.0)
    assert epoch == QuotaObservation(remaining=7, reset_s=45.0)


def test_retry_after_on_429_and_503_pauses() -> None:
    assert read_quota(429, h(("Retry-After", "7")), EPOCH) == QuotaObservation(pause_s=7.0)
    assert read_quota(503, h(("Retry-After", "2")), EPOCH) == QuotaObservation(pause_s=2.0)
    assert read_quota(200, h(("Retry-After", "2")), EPOCH) is None  # only on 429/503
    assert read_quota(503, [], EPOCH) is None  # a plain 503 is the breaker's business


def test_429_without_retry_after_uses_the_reset_or_a_default() -> None:
    with_reset = read_quota(429, h(("X-RateLimit-Remaining", "0"), ("X-RateLimit-Reset", "12")), EPOCH)
    assert with_reset is not None
    assert with_reset.pause_s == 12.0
    bare = read_quota(429, [], EPOCH)
    assert bare is not None
    assert bare.pause_s == DEFAULT_PAUSE_S


@pytest.mark.parametrize("value", ["abc", "-5", "1e9", "99999999999999999999", '"p";r=-1;t=5', "\xff"])
def test_garbage_is_ignored_and_huge_values_capped(value: str) -> None:
    obs = read_quota(
        200,
        [(b"x-ratelimit-remaining", value.encode("latin-1")), (b"ratelimit", value.encode("latin-1"))],
        EPOCH,
    )
    assert obs is None
    capped = read_quota(429, h(("Retry-After", "999999999")), EPOCH)
    assert capped is not None
    assert capped.pause_s == MAX_PAUSE_S


def test_pause_holds_until_reset_and_never_shortens() -> None:
    state = QuotaState()
    state.observe(QuotaObservation(pause_s=10.0), now=100.0)
    assert state.reserve(101.0, max_wait_s=20.0) == pytest.approx((True, 9.0))
    assert state.reserve(101.0, max_wait_s=1.0) == pytest.approx((False, 9.0))
    state.observe(QuotaObservation(pause_s=1.0), now=101.0)
    assert state.paused_for(101.0) == pytest.approx(9.0)
    assert state.reserve(110.0, max_wait_s=0.0) == (True, 0.0)


def test_remaining_zero_pauses_until_the_reset() -> None:
    state = QuotaState()
    state.observe(QuotaObservation(limit=100, remaining=0, reset_s=5.0), now=0.0)
    assert state.paused_for(1.0) == pytest.approx(4.0)


def test_low_remaining_paces_requests_until_the_reset() -> None:
    state = QuotaState(pace_below=0.1)
    state.observe(QuotaObservation(limit=100, remaining=50, reset_s=10.0), now=0.0)
    assert state.reserve(0.0, 0.0) == (True, 0.0)  # plenty left: no pacing
    state.observe(QuotaObservation(limit=100, remaining=5, reset_s=10.0), now=0.0)
    waits = [state.reserve(0.0, max_wait_s=5.0) for _ in range(4)]
    assert waits == [
        (True, 0.0),
        (True, pytest.approx(2.0)),
        (True, pytest.approx(4.0)),
        (False, pytest.approx(6.0)),
    ]
    assert state.reserve(10.5, 0.0) == (True, 0.0)  # past the reset: pacing is over
