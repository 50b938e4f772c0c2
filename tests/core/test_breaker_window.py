import pytest

from resilient_ambassador.core.breaker_window import VolumeWindow


def test_satisfied_only_with_min_requests_inside_the_window() -> None:
    window = VolumeWindow(min_requests=3, window_s=10.0)
    assert not window.satisfied(0.0)
    window.record(0.0)
    window.record(1.0)
    assert not window.satisfied(1.0)
    window.record(9.0)
    assert window.satisfied(9.0)
    assert window.satisfied(9.999)
    assert not window.satisfied(10.0)  # the request at 0.0 has slid out: (now - 10, now]


def test_sparse_requests_never_satisfy_it() -> None:
    window = VolumeWindow(min_requests=3, window_s=10.0)
    for i in range(100):
        window.record(i * 5.0)  # two per window at most
        assert not window.satisfied(i * 5.0)


def test_count_saturates_at_min_requests_and_memory_is_bounded() -> None:
    window = VolumeWindow(min_requests=4, window_s=10.0)
    for i in range(1000):
        window.record(i * 0.001)
    assert window.count(1.0) == 4
    assert window.count(100.0) == 0


def test_zero_min_requests_turns_the_guard_off() -> None:
    window = VolumeWindow(min_requests=0, window_s=10.0)
    assert window.satisfied(0.0)
    window.record(0.0)
    assert window.count(0.0) == 0


@pytest.mark.parametrize(("min_requests", "window_s"), [(-1, 10.0), (1, 0.0)])
def test_rejects_nonsense(min_requests: int, window_s: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        VolumeWindow(min_requests, window_s)
