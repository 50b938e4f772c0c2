from resilient_ambassador.core.log_throttle import LogThrottle


def test_one_line_per_interval_per_key_with_the_suppressed_count() -> None:
    throttle = LogThrottle(interval_s=1.0)
    assert throttle.allow("a", 0.0) == 0
    assert throttle.allow("a", 0.1) is None
    assert throttle.allow("a", 0.9) is None
    assert throttle.allow("b", 0.9) == 0  # keys are independent
    assert throttle.allow("a", 1.0) == 2
    assert throttle.allow("a", 1.5) is None
    assert throttle.allow("a", 5.0) == 1
