"""HTTP/1.1 message syntax and framing (RFC 9112), sans I/O: heads parsed from bytes, heads
serialised to bytes, and the three body framings (Content-Length, chunked, until close).

Why not h11 here: a forwarding proxy parses two heads and writes two per request, and h11's
per-event objects and per-field validation cost more than the rest of the daemon together
(docs/architecture.md, "The HTTP/1.1 codec", has the profile). This module validates a whole
head with one compiled regular expression and splits it in C, with h11's grammar and stricter
framing rules. h11 stays the reference: tests/core/test_http1.py and the fuzzers check this
module against it on every input they generate.

Nothing here reads a socket or knows about routes; callers map `FramingError` to their own
error (400s for clients, a bad-response 502 for upstreams).
"""

from __future__ import annotations

import re
from typing import Final, final

from resilient_ambassador.core.messages import Headers

# RFC 9110 5.6.2 token; 5.5 field-value (VCHAR / obs-text, inner SP/HTAB); RFC 9112 3 and 4.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_FIELD_CHAR = rb"[\x21-\x7e\x80-\xff]"
_FIELD_VALUE = rb"(?:" + _FIELD_CHAR + rb"+(?:[ \t]+" + _FIELD_CHAR + rb"+)*)?"
_FIELD_LINE = _TOKEN + rb":[ \t]*" + _FIELD_VALUE + rb"[ \t]*\r\n"
# The whole field block at once (one C call), then the pairs out of it (another).
_FIELD_BLOCK: Final = re.compile(rb"(?:" + _FIELD_LINE + rb")*")
_FIELD_PAIRS: Final = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _FIELD_VALUE + rb")[ \t]*\r\n")
_FIELD_VALUE_RE: Final = re.compile(_FIELD_VALUE)
# request-line = method SP request-target SP HTTP-version (targets are VCHARs, RFC 9112 3.2).
_REQUEST_LINE: Final = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")
# status-line = HTTP-version SP status-code SP [ reason-phrase ] (h11 also takes no SP).
_STATUS_LINE: Final = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\r\n")
# chunk = chunk-size [ chunk-ext ] CRLF (RFC 9112 7.1, 7.1.1); quoted-string per RFC 9110 5.6.4.
_QUOTED = rb'"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*"'
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:[ \t]*;[ \t]*"
    + _TOKEN
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN
    + rb"|"
    + _QUOTED
    + rb"))?)*)\r\n"
)
_DIGITS: Final = re.compile(rb"[0-9]{1,18}")

# A chunk line beyond this is refused: 16 hex digits plus extensions up to 1 KiB (nginx and
# Envoy do not cap extensions; HAProxy counts them in its 16 KiB line; we never forward them).
MAX_CHUNK_EXT_BYTES = 1024
MAX_CHUNK_LINE_BYTES = 16 + MAX_CHUNK_EXT_BYTES + 2
HEAD_END = b"\r\n\r\n"


class FramingError(Exception):
    """The peer broke HTTP/1.1 syntax or framing. `status`: what to answer a client with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@final
class RequestHead:
    """A parsed request head; names lower-cased, values with surrounding whitespace removed."""

    __slots__ = (
        "chunked",
        "content_length",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "target",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: Headers,
        host: bytes | None,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        expect_continue: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host = host
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


@final
class ResponseHead:
    """A parsed response head and how its body is framed: `content_length` (None with
    `chunked` or a body delimited by the connection's close), `keep_alive` whether the
    connection may carry another request afterwards."""

    __slots__ = ("chunked", "content_length", "headers", "keep_alive", "reason", "status", "version")

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: Headers,
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive


def _fields(block: bytes) -> Headers:
    if _FIELD_BLOCK.fullmatch(block) is None:
        raise FramingError("invalid header field")
    return [(name.lower(), value) for name, value in _FIELD_PAIRS.findall(block)]


def _content_length(values: list[bytes]) -> int:
    """RFC 9112 6.3: several Content-Length values (in one field or several) must all agree."""
    if len(values) == 1 and _DIGITS.fullmatch(values[0]) is not None:
        return int(values[0])  # the usual case: one plain number
    lengths = {v.strip(b" \t") for value in values for v in value.split(b",")}
    if len(lengths) != 1:
        raise FramingError("conflicting Content-Length values")
    (text,) = lengths
    if _DIGITS.fullmatch(text) is None:
        raise FramingError("invalid Content-Length")
    return int(text)


def declared_length(headers: Headers) -> int | None:
    """The body length a head we are about to send declares (None: no Content-Length).
    Raises FramingError for a value we would not accept from a peer either."""
    values = [v for n, v in headers if n == b"content-length"]
    return _content_length(values) if values else None


def _keep_alive(version: bytes, connection: list[bytes]) -> bool:
    """RFC 9112 9.3: HTTP/1.1 persists unless `close`; HTTP/1.0 only with `keep-alive`."""
    if not connection:
        return version == b"1.1"
    tokens = {t.strip(b" \t").lower() for value in connection for t in value.split(b",")}
    return b"close" not in tokens and (version == b"1.1" or b"keep-alive" in tokens)


def _framing_fields(
    headers: Headers,
) -> tuple[list[bytes], list[bytes], list[bytes], list[bytes], bytes | None]:
    """The values of the fields that frame a message, in one pass: (Host, Content-Length,
    Transfer-Encoding, Connection, Expect)."""
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    expect: bytes | None = None
    for name, value in headers:
        if name == b"content-length":
            lengths.append(value)
        elif name == b"host":
            hosts.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
        elif name == b"connection":
            connection.append(value)
        elif name == b"expect":
            expect = value
    return hosts, lengths, codings, connection, expect


def _declared(headers: Headers, lengths: list[bytes]) -> tuple[Headers, int | None]:
    """The Content-Length the values agree on (None without any), and the headers with them as
    one field (RFC 9112 6.3 lets a recipient do so), so whoever reads the head next sees
    exactly one number."""
    if not lengths:
        return headers, None
    length = _content_length(lengths)
    if len(lengths) > 1 or lengths[0] != b"%d" % length:
        headers = [(n, v) for n, v in headers if n != b"content-length"]
        headers.append((b"content-length", b"%d" % length))
    return headers, length


def _chunked(codings: list[bytes]) -> bool:
    """RFC 9112 6.1: only `chunked`, and only once; anything else we cannot frame (501)."""
    if not codings:
        return False
    if len(codings) > 1 or codings[0].strip(b" \t").lower() != b"chunked":
        raise FramingError("unsupported Transfer-Encoding", 501)
    return True


def parse_request_head(head: bytes) -> RequestHead:
    """`head`: the bytes of one request head, from the request line to the blank line (as
    `find_head_end` delimits them; empty lines before it already skipped)."""
    line = _REQUEST_LINE.match(head)
    if line is None:
        raise FramingError("malformed request line")
    method, target, major, minor = line.groups()
    version = major + b"." + minor
    if version not in (b"1.1", b"1.0"):
        raise FramingError("only HTTP/1.0 and HTTP/1.1", 505)
    headers = _fields(head[line.end() : -2])
    hosts, lengths, codings, connection, expect = _framing_fields(headers)
    if len(hosts) > 1 or (not hosts and version == b"1.1"):
        # RFC 9112 3.2: exactly one Host in HTTP/1.1; several are refused in any version.
        raise FramingError("more than one Host header" if hosts else "missing Host header")
    headers, content_length = _declared(headers, lengths)
    if codings and lengths:
        # RFC 9112 6.3: may be a smuggling attempt; a proxy MUST NOT forward both.
        raise FramingError("both Content-Length and Transfer-Encoding")
    chunked = _chunked(codings)
    # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is handled, then the connection is closed.
    keep_alive = _keep_alive(version, connection) and not (chunked and version == b"1.0")
    expect_continue = (
        expect is not None and version == b"1.1" and expect.strip(b" \t").lower() == b"100-continue"
    )
    host = hosts[0] if hosts else None
    return RequestHead(
        method, target, version, headers, host, content_length, chunked, keep_alive, expect_continue
    )


def parse_response_head(head: bytes, request_method: bytes) -> ResponseHead:
    """`head`: one response head up to its blank line. Framing follows RFC 9112 6.3 for the
    request that `request_method` made."""
    line = _STATUS_LINE.match(head)
    if line is None:
        raise FramingError("malformed status line")
    major, minor, code, reason = line.groups()
    version = major + b"." + minor
    if major != b"1":
        raise FramingError("not an HTTP/1.x response")
    status = int(code)
    if status < 100:
        raise FramingError("invalid status code")
    headers = _fields(head[line.end() : -2])
    _, lengths, codings, connection, _ = _framing_fields(headers)
    keep_alive = _keep_alive(version, connection)
    chunked = _chunked(codings)  # checked even where there is no body: a bad one is a bad peer
    headers, content_length = _declared(headers, lengths)
    if request_method == b"HEAD" or status < 200 or status in (204, 304):
        return ResponseHead(status, reason or b"", version, headers, 0, False, keep_alive)
    if chunked and lengths:
        content_length = None
        keep_alive = False  # RFC 9112 6.3: chunked wins; never reuse such a connection
    elif not chunked and not lengths:
        keep_alive = False  # the body ends when the upstream closes
    return ResponseHead(status, reason or b"", version, headers, content_length, chunked, keep_alive)


def valid_field_value(value: bytes) -> bool:
    """For values we did not parse ourselves (injected credentials, config): no CR, LF, NUL."""
    return _FIELD_VALUE_RE.fullmatch(value) is not None


def serialize_fields(headers: Headers) -> bytes:
    return b"".join([name + b": " + value + b"\r\n" for name, value in headers])


def request_head_bytes(method: bytes, target: bytes, headers: Headers) -> bytes:
    head = b"%b %b HTTP/1.1\r\n%b\r\n" % (method, target, serialize_fields(headers))
    _check_lines(head, len(headers) + 2)
    return head


def response_head_bytes(status: int, reason: bytes, headers: Headers) -> bytes:
    head = b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, serialize_fields(headers))
    _check_lines(head, len(headers) + 2)
    return head


def _check_lines(head: bytes, lines: int) -> None:
    """Every CR and LF in a head we write must be one of our own line ends: a value holding
    either would split the head (response splitting / request smuggling)."""
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise ValueError("CR or LF in a header name or value")


def chunk_bytes(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


LAST_CHUNK = b"0\r\n\r\n"


@final
class ChunkedDecoder:
    """Decodes a chunked body from a buffer the caller fills (RFC 9112 7.1). Extensions are
    validated and dropped; trailer fields are validated, capped and dropped (we never forward
    them). `declared_left`: bytes of the current chunk still to come, as its size line said,
    so a chunk claiming 2**64 bytes can be refused before any of it is streamed."""

    __slots__ = (
        "_state",
        "_trailer_bytes",
        "_trailers",
        "declared_left",
        "done",
        "max_trailer_bytes",
        "max_trailers",
    )

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, *, max_trailers: int = 100, max_trailer_bytes: int = 32 * 1024) -> None:
        self._state = self._SIZE
        self.declared_left = 0
        self._trailers = 0
        self._trailer_bytes = 0
        self.max_trailers = max_trailers
        self.max_trailer_bytes = max_trailer_bytes
        self.done = False

    def decode(self, buf: bytearray) -> bytes:
        """Consume what it can of `buf` and return the body bytes found (maybe b"", then more
        input is needed unless `done`). Bytes after the end of the body stay in `buf`."""
        out: list[bytes] = []
        while not self.done:
            state = self._state
            if state == self._DATA:
                take = min(self.declared_left, len(buf))
                if take == 0:
                    break
                out.append(bytes(buf[:take]))
                del buf[:take]
                self.declared_left -= take
                if self.declared_left == 0:
                    self._state = self._DATA_END
            elif state == self._DATA_END:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise FramingError("chunk data longer than its size")
                del buf[:2]
                self._state = self._SIZE
            elif state == self._SIZE:
                end = buf.find(b"\r\n", 0, MAX_CHUNK_LINE_BYTES)
                if end == -1:
                    if len(buf) >= MAX_CHUNK_LINE_BYTES or b"\n" in buf:
                        raise FramingError("invalid or oversized chunk size line")
                    break
                match = _CHUNK_LINE.fullmatch(buf, 0, end + 2)
                if match is None:
                    raise FramingError("invalid chunk size line")
                size = int(match.group(1), 16)
                del buf[: end + 2]
                if size:
                    self.declared_left = size
                    self._state = self._DATA
                else:
                    self._state = self._TRAILER
            else:  # trailer section, then the final CRLF
                end = buf.find(b"\r\n")
                if end == -1:
                    if len(buf) + self._trailer_bytes > self.max_trailer_bytes or b"\n" in buf:
                        raise FramingError("invalid or oversized trailer section", 431)
                    break
                if end == 0:
                    del buf[:2]
                    self.done = True
                    break
                self._trailers += 1
                self._trailer_bytes += end + 2
                if self._trailers > self.max_trailers or self._trailer_bytes > self.max_trailer_bytes:
                    raise FramingError("too many trailer fields", 431)
                if _FIELD_BLOCK.fullmatch(buf, 0, end + 2) is None:
                    raise FramingError("invalid trailer field")
                del buf[: end + 2]
        return b"".join(out)
