from __future__ import annotations

import pytest

from resilient_ambassador.core.trace_context import (
    sanitize_trace_headers,
    valid_baggage,
    valid_traceparent,
    valid_tracestate,
)

GOOD = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (GOOD, True),
        (b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", True),  # a future version
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", False),
        (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
        (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),  # upper case
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", False),
        (GOOD + b"x" * 10_000, False),
        (b"", False),
    ],
)
def test_traceparent(value: bytes, ok: bool) -> None:
    assert valid_traceparent(value) is ok


def test_tracestate_limits() -> None:
    assert valid_tracestate(b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    assert valid_tracestate(b"vendor@tenant=value")
    assert not valid_tracestate(b"BAD=x")
    assert not valid_tracestate(b",".join(b"k%d=v" % i for i in range(33)))
    assert not valid_tracestate(b"k=" + b"v" * 600)


def test_baggage_limits() -> None:
    assert valid_baggage(b"userId=alice,serverNode=DF%2028;prop=1")
    assert not valid_baggage(b"k=" + b"v" * 9000)
    assert not valid_baggage(b",".join(b"k%d=v" % i for i in range(181)))
    assert not valid_baggage(b"no-equals-sign")


def test_sanitize_keeps_good_and_drops_bad() -> None:
    headers = [(b"host", b"x"), (b"traceparent", GOOD), (b"tracestate", b"a=b"), (b"baggage", b"k=v")]
    assert sanitize_trace_headers(headers) == (headers, True)

    repeated = [(b"traceparent", GOOD), (b"traceparent", GOOD), (b"tracestate", b"a=b")]
    assert sanitize_trace_headers(repeated) == ([], False)

    oversized_baggage = [(b"traceparent", GOOD), (b"baggage", b"k=" + b"v" * 9000)]
    assert sanitize_trace_headers(oversized_baggage) == ([(b"traceparent", GOOD)], True)

    assert sanitize_trace_headers([(b"host", b"x")]) == ([(b"host", b"x")], False)
