"""Percentiles, the open-loop schedule and its coordinated-omission correction, wrk parsing."""

from __future__ import annotations

import math

import pytest
from loadgen import (
    OpenLoopSchedule,
    _parse_head,
    corrected_latencies_s,
    new_histogram,
    parse_wrk_output,
    percentile,
    summarise_histogram,
    summarise_latencies,
)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 99.9) == 100.0
    assert percentile(values, 0) == 1.0  # the smallest rank is 1
    assert percentile([7.0], 50) == 7.0
    assert math.isnan(percentile([], 50))


def test_summarise_latencies_reports_ms_under_their_keys() -> None:
    summary = summarise_latencies([0.001 * v for v in range(1000, 0, -1)])  # 1..1000 ms, unsorted
    assert summary == pytest.approx({"p50": 500.0, "p90": 900.0, "p99": 990.0, "p99.9": 999.0, "max": 1000.0})


def test_hdr_histogram_percentiles_agree_with_exact_ones_within_its_precision() -> None:
    pytest.importorskip("hdrh")
    samples_us = [(i * 7919) % 50_000 + 50 for i in range(20_000)]  # 50 us .. 50 ms, spread out
    halves = [new_histogram(), new_histogram()]
    for i, value in enumerate(samples_us):
        halves[i % 2].record_value(value)
    count, from_hdr = summarise_histogram([h.encode() for h in halves])  # merged as the parent does
    exact = summarise_latencies([v / 1e6 for v in samples_us])
    assert count == len(samples_us)
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        assert from_hdr[key] == pytest.approx(exact[key], rel=2e-3)  # 3 significant digits


def test_open_loop_schedule_hands_out_requests_at_their_intended_times() -> None:
    schedule = OpenLoopSchedule(start_s=10.0, rate_per_s=4.0)  # one every 0.25 s
    assert schedule.take_due(9.99) is None
    assert schedule.take_due(10.0) == 10.0
    assert schedule.take_due(10.2) is None
    # Late: every request due by then comes out, each with its own intended time.
    assert [schedule.take_due(11.0) for _ in range(5)] == [10.25, 10.5, 10.75, 11.0, None]
    assert schedule.issued == 5
    assert schedule.count_between(10.0, 11.0) == 4  # 10.0, 10.25, 10.5, 10.75
    assert schedule.count_between(10.1, 10.5) == 1  # 10.25 only: the end is excluded
    assert schedule.count_between(11.0, 10.0) == 0
    with pytest.raises(ValueError, match="positive"):
        OpenLoopSchedule(0.0, 0.0)


def _one_connection_with_a_stall(
    rate_per_s: float, stall_until_s: float, service_s: float, end_s: float
) -> tuple[list[float], list[float], list[float]]:
    """A server on one connection that answers each request `service_s` after it arrives,
    except that nothing is answered before `stall_until_s`: (intended, sent, completed)."""
    schedule = OpenLoopSchedule(0.0, rate_per_s)
    intended, sent, completed = [], [], []
    free_at = 0.0
    while (send_at := max(free_at, schedule.next_due_s())) < end_s:
        due = schedule.take_due(send_at)
        assert due is not None
        done = max(send_at, stall_until_s) + service_s
        intended.append(due)
        sent.append(send_at)
        completed.append(done)
        free_at = done
    return intended, sent, completed


def test_a_stall_shows_in_corrected_latencies_and_not_in_send_timed_ones() -> None:
    intended, sent, completed = _one_connection_with_a_stall(
        rate_per_s=100.0, stall_until_s=1.0, service_s=0.001, end_s=3.0
    )
    corrected = sorted(corrected_latencies_s(intended, completed))
    naive = sorted(done - start for start, done in zip(sent, completed, strict=True))
    # Timed from the send, only the one request caught in the stall saw it: p99 looks fine.
    assert percentile(naive, 99) < 0.01
    # Timed from when each was due, the 100 requests due during the stall all waited: the 50
    # due in its first half more than 0.5 s, plus a few queued behind them while the backlog
    # drained at one per millisecond.
    assert percentile(corrected, 99) > 0.9
    assert 50 <= sum(1 for latency in corrected if latency > 0.5) <= 60
    assert sum(1 for latency in corrected if latency > 0.002) >= 100
    assert len(intended) == 300  # the rate is kept: every due request was sent eventually


def test_parse_head_checks_the_expected_status_and_framing() -> None:
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\nconnection: close"
    assert _parse_head(ok) == (True, 12, True)
    breaker = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 40"
    assert _parse_head(breaker) == (False, 40, False)
    assert _parse_head(breaker, b"503") == (True, 40, False)
    assert _parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3") is None


WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8000/bench
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    17.20ms    4.10ms  61.43ms   78.00%
    Req/Sec     0.93k   101.00     1.10k    70.00%
  Latency Distribution
     50%   16.32ms
     75%   18.01ms
     90%   21.55ms
     99%   28.44ms
  9170 requests in 5.00s, 10.71MB read
  Socket errors: connect 0, read 2, write 1, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:   1833.42
"""


def test_wrk_output_is_parsed_with_its_errors() -> None:
    result = parse_wrk_output(WRK_OUTPUT)
    assert result.requests == 9170
    assert result.measured_s == 5.0
    assert result.percentiles_ms == pytest.approx(
        {"p50": 16.32, "p75": 18.01, "p90": 21.55, "p99": 28.44, "max": 61.43}
    )
    assert result.errors == {"connect": 0, "eof": 0, "reset": 3, "timeout": 3, "status": 7, "framing": 0}
