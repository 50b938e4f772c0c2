"""Pure header and framing rules (RFC 9110 7.6, RFC 9112)."""

from __future__ import annotations

import pytest

from resilient_ambassador.core.config import ClientLimits
from resilient_ambassador.core.errors import ClientError
from resilient_ambassador.core.headers import (
    check_request,
    connection_tokens,
    forward_request_headers,
    inject_headers,
    inject_query,
    normalize_path,
    origin_form_target,
    response_headers_for_client,
    scan_request_head,
)

LIMITS = ClientLimits(max_request_line_bytes=64, max_header_bytes=128, max_header_count=3)


def test_scan_finds_complete_head_and_its_length() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert scan_request_head(head + b"body", LIMITS) == len(head)


def test_scan_skips_leading_empty_lines() -> None:
    assert scan_request_head(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", LIMITS) == 31


def test_scan_incomplete_within_limits() -> None:
    assert scan_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n", LIMITS) == 0
    assert scan_request_head(b"GET /", LIMITS) == 0


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /" + b"a" * 64 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /" + b"a" * 70, 414),  # incomplete line already too long
        (b"GET / HTTP/1.1\r\nX: " + b"v" * 130 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nX: " + b"v" * 130, 431),  # incomplete head already too large
        (b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", 431),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n", 400),  # bare LF before the head is complete
        (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n", 400),
    ],
    ids=[
        "line",
        "line-incomplete",
        "headers",
        "headers-incomplete",
        "count",
        "bare-lf",
        "bare-lf-incomplete",
        "obs-fold-space",
        "obs-fold-tab",
    ],
)
def test_scan_rejects(data: bytes, status: int) -> None:
    with pytest.raises(ClientError) as caught:
        scan_request_head(data, LIMITS)
    assert caught.value.status == status


def test_scan_accepts_exactly_the_limits() -> None:
    line = b"GET /" + b"a" * (64 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == 64
    head = line + b"\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"
    assert scan_request_head(head, LIMITS) == len(head)


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        (b"get", b"/", 400),
        (b"CONNECT", b"a:443", 405),
        (b"GET", b"*", 400),
    ],
)
def test_check_request_rejects(method: bytes, target: bytes, status: int) -> None:
    with pytest.raises(ClientError) as caught:
        check_request(method, target)
    assert caught.value.status == status


def test_check_request_accepts_ordinary_requests() -> None:
    check_request(b"GET", b"/x")
    check_request(b"OPTIONS", b"*")
    check_request(b"PROPFIND", b"/x")


def test_origin_form_target() -> None:
    assert origin_form_target(b"/a?b", b"h") == b"/a?b"
    assert origin_form_target(b"http://H:80/a?b", b"h:80") == b"/a?b"
    assert origin_form_target(b"HTTPS://h", b"h") == b"/"
    for target, host in [(b"http://169.254.169.254/x", b"h"), (b"http://h/x", None), (b"ftp://h/x", b"h")]:
        with pytest.raises(ClientError):
            origin_form_target(target, host)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/a/b?x=../y", b"/a/b?x=../y"),
        (b"/a/../b", b"/b"),
        (b"/a/./b/", b"/a/b/"),
        (b"/../../etc", b"/etc"),
        (b"/api/%2e%2e/admin", b"/admin"),
        (b"/api/%2E%2E", b"/"),
        (b"/a/b/..", b"/a/"),
        (b"/v1.2/x", b"/v1.2/x"),
        (b"//v1/a/../b", b"//v1/b"),
    ],
)
def test_normalize_path(target: bytes, expected: bytes) -> None:
    assert normalize_path(target) == expected


def test_connection_tokens_are_lowercased_and_split() -> None:
    assert connection_tokens([(b"connection", b"close, X-Api-Key"), (b"connection", b"Upgrade")]) == {
        b"close",
        b"x-api-key",
        b"upgrade",
    }


def test_forward_request_headers() -> None:
    out = forward_request_headers(
        [
            (b"host", b"localhost:8000"),
            (b"connection", b"keep-alive, x-secret-hop"),
            (b"x-secret-hop", b"1"),
            (b"te", b"trailers"),
            (b"upgrade", b"websocket"),
            (b"proxy-authorization", b"Basic x"),
            (b"x-forwarded-for", b"1.1.1.1"),
            (b"x-forwarded-proto", b"https"),
            (b"via", b"1.0 other"),
            (b"x_api_key", b"smuggled"),
            (b"accept", b"*/*"),
            (b"content-length", b"3"),
        ],
        upstream_host=b"api.example.com",
        client_ip=b"10.0.0.2",
        downstream_scheme=b"http",
        chunked_body=False,
    )
    assert out == [
        (b"host", b"api.example.com"),
        (b"accept", b"*/*"),
        (b"content-length", b"3"),
        (b"x-forwarded-for", b"1.1.1.1, 10.0.0.2"),
        (b"x-forwarded-proto", b"http"),
        (b"x-forwarded-host", b"localhost:8000"),
        (b"via", b"1.0 other, 1.1 resilient-ambassador"),
    ]


def test_forward_request_headers_marks_chunked_bodies() -> None:
    out = forward_request_headers(
        [(b"host", b"a"), (b"transfer-encoding", b"chunked")],
        upstream_host=b"u",
        client_ip=b"1",
        downstream_scheme=b"http",
        chunked_body=True,
    )
    assert out.count((b"transfer-encoding", b"chunked")) == 1


def test_inject_headers_replaces_every_client_copy() -> None:
    out = inject_headers(
        [(b"x-api-key", b"a"), (b"accept", b"*/*"), (b"x-api-key", b"b")], [(b"x-api-key", b"k")]
    )
    assert out == [(b"accept", b"*/*"), (b"x-api-key", b"k")]


def test_inject_query_replaces_client_copies() -> None:
    assert inject_query(b"/p", [(b"api_key", b"k")]) == b"/p?api_key=k"
    assert inject_query(b"/p?api_key=mine&q=1&api_key=2", [(b"api_key", b"k")]) == b"/p?q=1&api_key=k"
    assert inject_query(b"/p?q", []) == b"/p?q"


def test_response_headers_for_client_drops_hop_by_hop_and_secret_echoes() -> None:
    out = response_headers_for_client(
        [
            (b"connection", b"x-internal"),
            (b"x-internal", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"keep-alive", b"timeout=5"),
            (b"x-debug", b"key=SECRET"),
            (b"content-type", b"text/plain"),
        ],
        [b"SECRET"],
    )
    assert out == [(b"content-type", b"text/plain")]


def test_via_loop_detection() -> None:
    from resilient_ambassador.core.headers import MAX_AMBASSADOR_HOPS, via_loop

    me = b"a1b2c3d4"
    assert via_loop([(b"via", b"1.0 squid, 1.1 resilient-ambassador (00000000)")], me) is None
    assert via_loop([(b"via", b"1.1 resilient-ambassador (a1b2c3d4)")], me) == (
        "the request came back to this ambassador"
    )
    chain = b", ".join(b"1.1 resilient-ambassador (%08d)" % i for i in range(MAX_AMBASSADOR_HOPS))
    assert via_loop([(b"via", chain)], me) == f"the request already passed {MAX_AMBASSADOR_HOPS} ambassadors"
    assert via_loop([(b"host", b"x")], me) is None
