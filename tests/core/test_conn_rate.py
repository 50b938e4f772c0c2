from __future__ import annotations

import pytest

from resilient_ambassador.core.ratelimit import ConnectionRate


def test_burst_then_refill() -> None:
    rate = ConnectionRate(count=3, per_s=1.0)  # 3/s, bursts of 3
    assert [rate.try_take(10.0) for _ in range(4)] == [True, True, True, False]
    assert rate.try_take(10.2) is False  # 0.6 of a token
    assert rate.try_take(10.34) is True  # 1.02 tokens
    assert rate.try_take(100.0) is True
    assert [rate.try_take(100.0) for _ in range(3)] == [True, True, False]  # never above the burst


def test_slow_rate_and_clock_going_backwards() -> None:
    rate = ConnectionRate(count=1, per_s=60.0)  # 1/m
    assert rate.try_take(0.0) is True
    assert rate.try_take(59.0) is False
    assert rate.try_take(30.0) is False  # an earlier `now` adds nothing
    assert rate.try_take(60.0) is True


def test_invalid() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        ConnectionRate(count=0, per_s=1.0)
