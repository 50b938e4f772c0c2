"""core/http1.py: the codec's own rules, and agreement with h11 (the reference) on generated
heads and chunked bodies.

Where we knowingly differ from h11 we are stricter, never looser: a second Host, both framing
headers, a version other than 1.0/1.1, a Transfer-Encoding other than exactly `chunked`, a
Content-Length of more than 18 digits, and control characters in a field (h11 takes all but
NUL and whitespace; RFC 9110 5.5 makes them invalid). The differential tests skip nothing else.
"""

from __future__ import annotations

import re

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_ambassador.core.http1 import (
    LAST_CHUNK,
    MAX_CHUNK_LINE_BYTES,
    ChunkedDecoder,
    FramingError,
    chunk_bytes,
    declared_length,
    parse_request_head,
    parse_response_head,
    request_head_bytes,
    response_head_bytes,
    valid_field_value,
)

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- request heads ---------------------------------------------------------------------------


def test_request_head_is_parsed() -> None:
    head = parse_request_head(
        b"POST /a?b=c HTTP/1.1\r\nHost: api\r\nX-Thing:  spaced value \t\r\nContent-Length: 3\r\n\r\n"
    )
    assert (head.method, head.target, head.version, head.host) == (b"POST", b"/a?b=c", b"1.1", b"api")
    assert head.headers == [(b"host", b"api"), (b"x-thing", b"spaced value"), (b"content-length", b"3")]
    assert (head.content_length, head.chunked, head.keep_alive, head.has_body) == (3, False, True, True)


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        # RFC 9112 6.1: handled, then the connection is closed.
        (b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", False),
    ],
)
def test_keep_alive(head: bytes, keep_alive: bool) -> None:
    assert parse_request_head(head).keep_alive is keep_alive


def test_expect_continue_only_on_http11() -> None:
    assert parse_request_head(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\n\r\n").expect_continue
    assert not parse_request_head(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue


def test_agreeing_content_lengths_become_one_field() -> None:
    head = parse_request_head(
        b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\nHost: a\r\nContent-Length: 3\r\n\r\n"
    )
    assert head.content_length == 3
    assert [v for n, v in head.headers if n == b"content-length"] == [b"3"]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400),
        (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),  # whitespace before the colon
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 19 + b"\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            501,
        ),
    ],
)
def test_request_head_is_refused(head: bytes, status: int) -> None:
    with pytest.raises(FramingError) as caught:
        parse_request_head(head)
    assert caught.value.status == status


# -- response heads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "method", "framing"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"GET", (5, False, True)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET", (None, True, True)),
        (b"HTTP/1.1 200 OK\r\n\r\n", b"GET", (None, False, False)),  # until close
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"HEAD", (0, False, True)),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", b"GET", (0, False, True)),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"GET", (0, False, True)),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n", b"GET", (5, False, False)),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n", b"GET", (5, False, False)),
        # RFC 9112 6.3: chunked wins, and the connection is never reused.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET",
            (None, True, False),
        ),
        (b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", b"GET", (0, False, True)),
    ],
)
def test_response_framing(head: bytes, method: bytes, framing: tuple[int | None, bool, bool]) -> None:
    parsed = parse_response_head(head, method)
    assert (parsed.content_length, parsed.chunked, parsed.keep_alive) == framing


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 099 Odd\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nContent-Length: abc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\nb\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
)
def test_response_head_is_refused(head: bytes) -> None:
    with pytest.raises(FramingError):
        parse_response_head(head, b"GET")


# -- writing ---------------------------------------------------------------------------------


def test_heads_are_written_as_given() -> None:
    assert request_head_bytes(b"GET", b"/x", [(b"host", b"a")]) == b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n"
    assert response_head_bytes(204, b"No Content", []) == b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.mark.parametrize("value", [b"a\r\nx-injected: 1", b"a\nb", b"a\rb"])
def test_a_value_that_would_split_the_head_is_refused(value: bytes) -> None:
    assert not valid_field_value(value)
    with pytest.raises(ValueError, match="CR or LF"):
        request_head_bytes(b"GET", b"/", [(b"x-key", value)])
    with pytest.raises(ValueError, match="CR or LF"):
        response_head_bytes(200, b"OK", [(b"x-key", value)])


def test_declared_length() -> None:
    assert declared_length([(b"content-length", b"12")]) == 12
    assert declared_length([(b"x", b"1")]) is None
    with pytest.raises(FramingError):
        declared_length([(b"content-length", b"1"), (b"content-length", b"2")])


# -- chunked bodies --------------------------------------------------------------------------


def _decode_in_pieces(data: bytes, piece: int) -> tuple[bytes, bytes, bool]:
    """Feed `data` `piece` bytes at a time: (body, leftover, done)."""
    decoder = ChunkedDecoder()
    buffer = bytearray()
    body = b""
    for start in range(0, len(data), piece):
        buffer += data[start : start + piece]
        body += decoder.decode(buffer)
    return body, bytes(buffer), decoder.done


ENCODED = b'3;name=value;q="a \\" b"\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT'


@pytest.mark.parametrize("piece", [1, 2, 3, 7, len(ENCODED)])
def test_chunked_body_decodes_whatever_the_split(piece: int) -> None:
    assert _decode_in_pieces(ENCODED, piece) == (b"abc0123456789", b"NEXT", True)


def test_declared_size_is_known_before_the_data() -> None:
    decoder = ChunkedDecoder()
    assert decoder.decode(bytearray(b"FFFFFFFFFFFFFFED\r\nabc")) == b"abc"
    assert decoder.declared_left == 0xFFFFFFFFFFFFFFED - 3


@pytest.mark.parametrize(
    "data",
    [
        b"x\r\n",
        b"-1\r\n",
        b"1 2\r\n",
        b"11111111111111111\r\n",  # 17 hex digits
        b"3\nabc\r\n",
        b"3\r\nabcd\r\n",
        b"3;bad ext\r\n",
        b"3;a=" + b"a" * MAX_CHUNK_LINE_BYTES,  # no line end within the cap
        b"0\r\nBad Trailer: x\r\n\r\n",
    ],
)
def test_bad_chunked_bodies_are_refused(data: bytes) -> None:
    with pytest.raises(FramingError):
        ChunkedDecoder().decode(bytearray(data))


def test_trailer_section_is_capped() -> None:
    with pytest.raises(FramingError) as caught:
        ChunkedDecoder(max_trailers=2).decode(bytearray(b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n"))
    assert caught.value.status == 431


def test_chunks_round_trip() -> None:
    encoded = chunk_bytes(b"hello") + chunk_bytes(b"") + chunk_bytes(b"x" * 300) + LAST_CHUNK
    assert _decode_in_pieces(encoded, 5) == (b"hello" + b"x" * 300, b"", True)


# -- agreement with h11 ----------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~" + "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
names = st.one_of(
    st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"X-A", b"Accept"]),
    st.text(TOKEN_CHARS, min_size=1, max_size=8).map(str.encode),
    st.binary(min_size=0, max_size=6),
)
values = st.one_of(
    st.sampled_from([b"a", b"3", b"0", b"chunked", b"close", b" x ", b"1, 1", b"", b"\t\tv"]),
    st.binary(min_size=0, max_size=10),
)
fields = st.lists(st.tuples(names, values), max_size=6)


def _normalized(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """h11 keeps a length's leading zeros and lower-cases Transfer-Encoding; we write the
    number and keep the coding's case: the same meaning."""
    out = []
    for name, value in headers:
        if name == b"content-length":
            value = b"%d" % int(value)
        elif name == b"transfer-encoding":
            value = value.lower()
        out.append((name, value))
    return sorted(out)


def _h11_request(data: bytes) -> h11.Request | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _h11_stricter_rules_apply(head: bytes) -> bool:
    """Heads where we refuse on purpose what h11 takes (see the module docstring)."""
    if CONTROL.search(head):
        return True
    try:
        ours = parse_request_head(head)
    except FramingError as exc:
        return exc.status in (501, 505) or exc.message in (
            "more than one Host header",
            "both Content-Length and Transfer-Encoding",
            "invalid Content-Length",
        )
    return ours is None


@FUZZ
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"G T", b"get"]),
    target=st.sampled_from([b"/", b"/a?b=c", b"/\x80", b"*", b"/a b"]),
    version=st.sampled_from([b"1.1", b"1.0", b"1.2", b"2.0"]),
    header_fields=fields,
)
def test_request_heads_agree_with_h11(
    method: bytes, target: bytes, version: bytes, header_fields: list[tuple[bytes, bytes]]
) -> None:
    head = b"%b %b HTTP/%b\r\n" % (method, target, version)
    head += b"".join(n + b": " + v + b"\r\n" for n, v in header_fields) + b"\r\n"
    reference = _h11_request(head)
    try:
        ours = parse_request_head(head)
    except FramingError:
        assert reference is None or _h11_stricter_rules_apply(head)
        return
    assert reference is not None, "we accepted a head h11 refuses"
    assert (ours.method, ours.target, ours.version) == (
        reference.method,
        reference.target,
        reference.http_version,
    )
    assert _normalized(ours.headers) == _normalized(list(reference.headers))


def _h11_response(data: bytes, method: bytes) -> tuple[h11.Response, list[object]] | None:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    events: list[object] = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                break
            events.append(event)
            if isinstance(event, h11.EndOfMessage):
                break
    except h11.RemoteProtocolError:
        # A head h11 accepted, then a body cut short by the end of the data (these heads come
        # without their body): the head itself was fine.
        if not any(isinstance(e, h11.Response) for e in events):
            return None
    responses = [e for e in events if isinstance(e, h11.Response)]
    return (responses[0], events) if responses else None


@FUZZ
@given(
    status=st.sampled_from([b"200", b"204", b"304", b"404", b"99", b"2000"]),
    reason=st.sampled_from([b" OK", b"", b" Odd \x80 reason", b" bad\x00"]),
    header_fields=fields,
    method=st.sampled_from([b"GET", b"HEAD"]),
)
def test_response_heads_agree_with_h11(
    status: bytes, reason: bytes, header_fields: list[tuple[bytes, bytes]], method: bytes
) -> None:
    head = b"HTTP/1.1 " + status + reason + b"\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in header_fields) + b"\r\n"
    reference = _h11_response(head, method)
    try:
        ours = parse_response_head(head, method)
    except FramingError:
        if reference is not None and not CONTROL.search(head):
            # Stricter on purpose: a coding other than exactly `chunked`, an 18+ digit length.
            encodings = [v.lower() for n, v in reference[0].headers if n == b"transfer-encoding"]
            lengths = [v for n, v in reference[0].headers if n == b"content-length"]
            assert encodings or any(len(v) > 18 for v in lengths)
        return
    assert reference is not None, "we accepted a head h11 refuses"
    response = reference[0]
    assert (ours.status, ours.reason) == (response.status_code, response.reason)
    assert _normalized(ours.headers) == _normalized(list(response.headers))


@FUZZ
@given(
    chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    piece=st.integers(min_value=1, max_value=64),
)
def test_chunked_bodies_agree_with_h11(chunks: list[bytes], piece: int) -> None:
    encoded = b"".join(chunk_bytes(c) for c in chunks) + LAST_CHUNK
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    reference = _h11_response(head + encoded, b"GET")
    assert reference is not None
    h11_body = b"".join(bytes(e.data) for e in reference[1] if isinstance(e, h11.Data))
    assert _decode_in_pieces(encoded, piece) == (h11_body, b"", True)
