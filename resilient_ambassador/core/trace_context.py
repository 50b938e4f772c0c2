"""W3C Trace Context and Baggage headers arriving from the app: keep them only if well formed.

A malformed or oversized `traceparent` (or `tracestate`, `baggage`) must not travel on to a
third-party API, nor make the proxy join a trace it cannot parse: it is dropped, and when
tracing is on the request starts a new trace. Limits are the specifications' own: tracestate
at most 32 members and 512 characters (W3C Trace Context, section 3.3.1.1), baggage at most
8192 bytes and 180 members (W3C Baggage, section 3.3.1).
"""

from __future__ import annotations

import re

from resilient_ambassador.core.messages import Headers

TRACE_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})
MAX_TRACESTATE_CHARS = 512
MAX_TRACESTATE_MEMBERS = 32
MAX_BAGGAGE_BYTES = 8192
MAX_BAGGAGE_MEMBERS = 180

# version-traceid-parentid-flags; a future version may append fields after a dash.
_TRACEPARENT_RE = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACESTATE_MEMBER_RE = re.compile(
    rb"[a-z0-9][_0-9a-z\-*/]{0,255}(@[a-z][_0-9a-z\-*/]{0,13})?"  # key (simple or multi-tenant)
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"  # value
)
_BAGGAGE_MEMBER_RE = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\s*=\s*"  # key: an RFC 9110 token
    rb"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*(\s*;.*)?"  # value, then properties
)


def valid_traceparent(value: bytes) -> bool:
    match = _TRACEPARENT_RE.fullmatch(value)
    if match is None:
        return False
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return False
    return trace_id != b"0" * 32 and parent_id != b"0" * 16


def valid_tracestate(value: bytes) -> bool:
    if len(value) > MAX_TRACESTATE_CHARS:
        return False
    members = [m.strip(b" \t") for m in value.split(b",") if m.strip(b" \t")]
    return len(members) <= MAX_TRACESTATE_MEMBERS and all(_TRACESTATE_MEMBER_RE.fullmatch(m) for m in members)


def valid_baggage(value: bytes) -> bool:
    if len(value) > MAX_BAGGAGE_BYTES:
        return False
    members = [m.strip(b" \t") for m in value.split(b",")]
    return len(members) <= MAX_BAGGAGE_MEMBERS and all(_BAGGAGE_MEMBER_RE.fullmatch(m) for m in members)


def sanitize_trace_headers(headers: Headers) -> tuple[Headers, bool]:
    """The headers without trace-context headers that are malformed, oversized or repeated,
    and whether the `traceparent` kept (if any) may be trusted as a parent. A `tracestate`
    without a valid `traceparent` is meaningless and goes too (Trace Context 3.3)."""
    seen: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in TRACE_HEADERS:
            seen.setdefault(name, []).append(value)
    if not seen:
        return headers, False
    parent = seen.get(b"traceparent", [])
    parent_ok = len(parent) == 1 and valid_traceparent(parent[0])
    state = b",".join(seen.get(b"tracestate", []))
    state_ok = parent_ok and valid_tracestate(state)
    # Repeated baggage headers are one list (W3C Baggage 3.2): judge the joined value.
    baggage = b",".join(seen.get(b"baggage", []))
    baggage_ok = valid_baggage(baggage)
    keep = {b"traceparent": parent_ok, b"tracestate": state_ok, b"baggage": baggage_ok}
    return [(n, v) for n, v in headers if n not in TRACE_HEADERS or keep[n]], parent_ok
