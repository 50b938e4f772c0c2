"""Header rules for a forwarding proxy (RFC 9110 section 7.6, RFC 9112).

core/http1.py parses and frames; these are the proxy's own limits and rules on top:
`scan_request_head` bounds the raw bytes of a head (size, field count, bare LF, obs-fold) before
it is parsed, `check_request` refuses what must not be forwarded, and the rest rewrites headers
on the way through.
"""

from __future__ import annotations

from collections.abc import Iterable

from resilient_ambassador.core.config import ClientLimits
from resilient_ambassador.core.errors import ClientError
from resilient_ambassador.core.messages import Headers

# RFC 9110 7.6.1 + RFC 9112 7: connection-specific fields never forwarded. `expect` is not
# hop-by-hop by the RFC, but we answer 100-continue ourselves and send the upstream a
# complete body.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"expect",
    }
)

_HOP_BY_HOP_AND_HOST = HOP_BY_HOP | {b"host"}

VIA_PSEUDONYM = b"resilient-ambassador"
# Requests that already passed this many ambassadors are refused (508): a loop through other
# pods or processes, which the instance id below cannot see.
MAX_AMBASSADOR_HOPS = 5

HEAD_END = b"\r\n\r\n"


def scan_request_head(buf: bytes | bytearray, limits: ClientLimits) -> int:
    """The length of the request head at the start of `buf` (up to and including the blank
    line), or 0 while it is incomplete; our limits are enforced on its raw bytes.

    Raises ClientError (414/431/400). Runs on every read before the head is parsed, so an
    oversized head is refused as soon as it is, not once it is complete.
    """
    start = 0
    while buf.startswith(b"\r\n", start):  # RFC 9112 2.2: ignore empty lines before a request
        start += 2
    end = buf.find(HEAD_END, start)
    line_end = buf.find(b"\r\n", start)
    if line_end == -1 or line_end > end >= 0:
        line_end = end
    if line_end == -1:
        if len(buf) - start > limits.max_request_line_bytes:
            raise ClientError(414, "uri_too_long", "request line too long")
        if b"\n" in buf:
            raise ClientError(400, "bad_request", "bare LF in request head")
        return 0
    if line_end - start > limits.max_request_line_bytes:
        raise ClientError(414, "uri_too_long", "request line too long")
    if end == -1:
        if len(buf) - line_end > limits.max_header_bytes:
            raise ClientError(431, "headers_too_large", "request headers too large")
        if buf.count(b"\n", start) != buf.count(b"\r\n", start):
            raise ClientError(400, "bad_request", "bare LF in request head")
        return 0
    head_end = end + 4
    lines = buf.count(b"\r\n", start, head_end)
    if buf.count(b"\n", start, head_end) != lines:
        raise ClientError(400, "bad_request", "bare LF in request head")
    if buf.find(b"\n ", start, head_end) != -1 or buf.find(b"\n\t", start, head_end) != -1:
        # RFC 9112 5.2: a server MUST reject obs-fold (or replace it); a proxy that joins
        # lines differently from the upstream enables smuggling.
        raise ClientError(400, "bad_request", "obsolete line folding in request head")
    if head_end - start - (line_end - start) > limits.max_header_bytes + 4:
        raise ClientError(431, "headers_too_large", "request headers too large")
    if lines - 2 > limits.max_header_count:
        raise ClientError(431, "headers_too_large", "too many request header fields")
    return head_end


def check_request(method: bytes, target: bytes) -> None:
    """Reject what a forwarding proxy must not pass on (framing was checked by the parser).
    Raises ClientError."""
    if method.upper() != method:
        # Methods are case-sensitive (RFC 9110 9.1); `get` is not GET and often a probe.
        raise ClientError(400, "bad_request", "invalid method")
    if method == b"CONNECT":
        raise ClientError(405, "method_not_allowed", "CONNECT is not supported")
    if target == b"*" and method != b"OPTIONS":
        raise ClientError(400, "bad_request", "asterisk-form target is only valid for OPTIONS")


def origin_form_target(target: bytes, host: bytes | None) -> bytes:
    """Turn an absolute-form target into origin-form, refusing one whose authority is not the
    Host we route on (the proxy must never dial an address taken from the request)."""
    if target.startswith(b"/") or target == b"*":
        return target
    lowered = target[:8].lower()
    for scheme in (b"http://", b"https://"):
        if lowered.startswith(scheme):
            rest = target[len(scheme) :]
            slash = rest.find(b"/")
            authority, path = (rest, b"/") if slash == -1 else (rest[:slash], rest[slash:])
            if host is None or authority.lower() != host.lower():
                raise ClientError(400, "bad_request", "absolute-form target for another host")
            return path
    raise ClientError(400, "bad_request", "invalid request target")


def normalize_path(target: bytes) -> bytes:
    """RFC 3986 5.2.4 remove_dot_segments on the path (percent-encoded dots included), so
    `/api/../admin` cannot slip past a `/api` route. The query is kept as is."""
    path, sep, query = target.partition(b"?")
    if b"." not in path and b"%2" not in path:
        return target
    segments = path.split(b"/")
    out: list[bytes] = []
    for seg in segments[1:]:
        norm = seg.replace(b"%2e", b".").replace(b"%2E", b".")
        if norm == b"..":
            if out:
                out.pop()
        elif norm != b".":
            out.append(seg)
    if segments[-1].replace(b"%2e", b".").replace(b"%2E", b".") in (b".", b".."):
        out.append(b"")
    return b"/" + b"/".join(out) + sep + query


def connection_tokens(headers: Headers) -> set[bytes]:
    """Names listed in `Connection` (lower-case): RFC 9110 7.6.1 says they are hop-by-hop."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def via_loop(headers: Headers, instance: bytes) -> str | None:
    """Why this request is looping (None if it is not): our own instance in `Via` (it came
    back to this very process), or more than MAX_AMBASSADOR_HOPS ambassadors before us."""
    hops = 0
    own = b"(" + instance + b")"
    for name, value in headers:
        if name != b"via":
            continue
        for entry in value.split(b","):
            parts = entry.split()
            if len(parts) >= 2 and parts[1].lower() == VIA_PSEUDONYM:
                hops += 1
                if own in entry:
                    return "the request came back to this ambassador"
    if hops >= MAX_AMBASSADOR_HOPS:
        return f"the request already passed {hops} ambassadors"
    return None


def forward_request_headers(
    headers: Headers,
    *,
    upstream_host: bytes,
    client_ip: bytes,
    downstream_scheme: bytes,
    chunked_body: bool,
    instance: bytes = b"",
) -> Headers:
    """Headers for the upstream request: hop-by-hop and Connection-named fields removed, Host
    rewritten, X-Forwarded-* and Via added. Injected headers are added later, at the very last
    step (`inject_headers`), so no stage, log or span ever holds the secret."""
    named = connection_tokens(headers)
    drop = _HOP_BY_HOP_AND_HOST | named if named else _HOP_BY_HOP_AND_HOST
    out: Headers = [(b"host", upstream_host)]
    xff: bytes | None = None
    via: bytes | None = None
    original_host = b""
    for name, value in headers:
        if name == b"host":
            original_host = value
        if name in drop or b"_" in name:
            # Underscored names are dropped as nginx does: some servers read X_Api_Key as
            # X-Api-Key, which would let a client smuggle a second copy of a credential.
            continue
        if name == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
        elif name == b"via":
            via = value if via is None else via + b", " + value
        elif name not in (b"x-forwarded-proto", b"x-forwarded-host"):
            out.append((name, value))
    out.append((b"x-forwarded-for", client_ip if xff is None else xff + b", " + client_ip))
    out.append((b"x-forwarded-proto", downstream_scheme))
    if original_host:
        out.append((b"x-forwarded-host", original_host))
    own_via = b"1.1 " + VIA_PSEUDONYM + (b" (" + instance + b")" if instance else b"")
    out.append((b"via", own_via if via is None else via + b", " + own_via))
    if chunked_body:
        out.append((b"transfer-encoding", b"chunked"))
    return out


def inject_headers(headers: Headers, injected: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Replace every client copy of an injected header (never duplicate a credential)."""
    injected = list(injected)
    if not injected:
        return headers
    names = {name for name, _ in injected}
    return [(n, v) for n, v in headers if n not in names] + injected


def inject_query(target: bytes, params: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Set query parameters (already percent-encoded), replacing client copies."""
    params = list(params)
    if not params:
        return target
    path, _, query = target.partition(b"?")
    names = {name for name, _ in params}
    kept = [p for p in query.split(b"&") if p and p.split(b"=", 1)[0] not in names]
    kept.extend(name + b"=" + value for name, value in params)
    return path + b"?" + b"&".join(kept)


def response_headers_for_client(headers: Headers, secrets: Iterable[bytes] = ()) -> Headers:
    """Upstream response headers as the client may see them: hop-by-hop removed (the server
    sets its own framing), and any header echoing an injected secret dropped."""
    named = connection_tokens(headers)
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    secrets = [s for s in secrets if s]
    out: Headers = []
    for name, value in headers:
        if name in drop:
            continue
        if secrets and any(s in value for s in secrets):
            continue
        out.append((name, value))
    return out
