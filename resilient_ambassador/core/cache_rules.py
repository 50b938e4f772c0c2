"""The rules of a shared HTTP cache (RFC 9111, RFC 5861 stale-*, RFC 9211 Cache-Status).

Pure: times are POSIX seconds passed in (`now`, `request_time`, `response_time`), because
`Date`, `Expires` and `Last-Modified` are wall-clock. The cache stage asks these functions
what to do; the stores keep the resulting `CachedEntry` as it is.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import final

from resilient_ambassador.core.cache_control import (
    INVALID,
    CacheControl,
    cache_control,
    entity_tags,
    parse_http_date,
    vary_names,
    weak_match,
)
from resilient_ambassador.core.config import RouteCacheConfig
from resilient_ambassador.core.fingerprint import encode_parts
from resilient_ambassador.core.headers import HOP_BY_HOP
from resilient_ambassador.core.messages import Headers, header_value

# RFC 9110 15.1: statuses cacheable by default (heuristically). 206 is left out: we do not
# combine ranges, so a partial response is never stored.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Statuses we store when the response gives explicit freshness (final, and understood).
STORABLE_STATUSES = HEURISTIC_STATUSES | frozenset({302, 303, 307})
# RFC 9111 4.4: these invalidate the target URI on a non-error response.
UNSAFE_METHODS = frozenset({b"POST", b"PUT", b"DELETE", b"PATCH"})
# Heuristic freshness: 10% of the time since Last-Modified (RFC 9111 4.2.2), capped at a day
# as Squid and Varnish do.
HEURISTIC_FRACTION = 0.1
HEURISTIC_MAX_S = 86_400.0
# A stale entry with a validator (ETag, Last-Modified) is kept this much longer, so it can be
# revalidated with a cheap 304 instead of fetched again (nginx drops unused entries after 10 min).
VALIDATOR_KEEP_S = 600.0
# Headers never kept in a stored response: recomputed on every hit (Age), set by us from the
# stored body (Content-Length), never replayed to another client (Set-Cookie), or describing
# an earlier exchange (an upstream cache's Cache-Status).
_NOT_STORED = HOP_BY_HOP | {b"age", b"content-length", b"set-cookie", b"cache-status"}
# RFC 9111 3.2: a 304 updates the stored header fields except framing and these.
_NOT_UPDATED = _NOT_STORED | {b"content-encoding", b"content-range"}
# Request headers that make a request ask for credentials-specific content (RFC 9111 3.5;
# HARDENING.md treats Cookie the same way).
_CREDENTIAL_REQUEST_HEADERS = (b"authorization", b"cookie")
# Request headers some frameworks use to rewrite the URL or method behind a proxy. They are
# forwarded as they are, so they join the key: a primed entry can never answer a plain request.
UNKEYED_OVERRIDES = (b"x-original-url", b"x-rewrite-url", b"x-http-method-override", b"x-forwarded-host")
# Conditional request headers we answer ourselves and never forward on a cacheable miss.
CONDITIONAL_HEADERS = frozenset({b"if-none-match", b"if-modified-since"})


@final
@dataclass(frozen=True, slots=True)
class CachedEntry:
    """A stored response, ready to send: headers cleaned for replay, body whole."""

    key: str
    url_key: str  # shared by every variant of one URL: what invalidation and purge remove
    target: bytes  # the upstream target (path + query), kept for prefix purges
    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    response_time: float
    initial_age_s: float  # RFC 9111 4.2.3 corrected_initial_age
    lifetime_s: float  # freshness lifetime (0: always revalidate)
    swr_s: float  # stale-while-revalidate window after it goes stale
    sie_s: float  # stale-if-error window after it goes stale
    no_stale: bool  # must-revalidate, proxy-revalidate, s-maxage or no-cache: never stale
    credentials_ok: bool  # may answer requests with Authorization/Cookie (RFC 9111 3.5)
    vary: tuple[tuple[bytes, bytes | None], ...] = ()  # Vary'd names and the values stored for

    @property
    def size_bytes(self) -> int:
        return len(self.body) + sum(len(n) + len(v) + 4 for n, v in self.headers) + 256

    def age_s(self, now: float) -> float:
        """RFC 9111 4.2.3 current_age."""
        return self.initial_age_s + max(0.0, now - self.response_time)

    def ttl_s(self, now: float) -> float:
        """Freshness left (negative once stale): the Cache-Status `ttl`."""
        return self.lifetime_s - self.age_s(now)

    def storage_ttl_s(self, now: float) -> float:
        """How long a store must keep it: freshness left plus the longest stale window."""
        has_validator = self.header(b"etag") is not None or self.header(b"last-modified") is not None
        return self.ttl_s(now) + _kept_after_stale_s(self.no_stale, self.swr_s, self.sie_s, has_validator)

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class Freshness(enum.Enum):
    FRESH = "fresh"
    STALE_WHILE_REVALIDATE = "swr"  # serve it now, refresh in the background
    STALE = "stale"  # revalidate first; may still be served if the upstream fails (sie)


def request_bypass_reason(method: bytes, headers: Headers) -> str | None:
    """Why a request cannot be answered from or stored in the cache, or None. The values are
    RFC 9211 `fwd` reasons."""
    if method not in (b"GET", b"HEAD"):
        return "method"
    for name, _ in headers:
        if name == b"range":
            return "request"  # no range support: never serve or store partial content
    return None


def request_wants_revalidation(cc: CacheControl) -> bool:
    """The client asked for an end-to-end check (no-cache or max-age=0)."""
    return cc.has("no-cache") or cc.seconds("max-age") in (0, INVALID)


def has_credentials(headers: Headers) -> bool:
    # A loop, not any() over a generator: this runs on every cache lookup.
    for name, _ in headers:  # noqa: SIM110
        if name in _CREDENTIAL_REQUEST_HEADERS:
            return True
    return False


def not_stored_reason(
    method: bytes,
    request_headers: Headers,
    request_cc: CacheControl,
    status: int,
    response_headers: Headers,
    response_cc: CacheControl,
    config: RouteCacheConfig,
) -> str | None:
    """Why a response must not be stored (a Cache-Status `detail`), or None if it may be."""
    if method != b"GET":
        return "method"  # a HEAD response has no body to answer a later GET with
    if status not in STORABLE_STATUSES:
        return "status"
    if request_cc.has("no-store") or response_cc.has("no-store"):
        return "no-store"
    if response_cc.has("private"):
        return "private"  # RFC 9111 3: a shared cache never stores it (qualified or not)
    if has_credentials(request_headers) and not credentials_allowed(response_cc):
        return "authorization"
    if not config.store_set_cookie and any(n == b"set-cookie" for n, _ in response_headers):
        return "set-cookie"
    if vary_names(response_headers) == ("*",):
        return "vary-star"
    explicit = _explicit_freshness(response_cc, response_headers)
    if status not in HEURISTIC_STATUSES and not explicit and not response_cc.has("public"):
        return "status"
    return None


def credentials_allowed(cc: CacheControl) -> bool:
    """RFC 9111 3.5: a response to a request with Authorization may be stored (and reused)
    only with public, s-maxage or must-revalidate."""
    return cc.has("public") or cc.has("s-maxage") or cc.has("must-revalidate")


def _explicit_freshness(cc: CacheControl, headers: Headers) -> bool:
    return cc.has("s-maxage") or cc.has("max-age") or header_value(headers, b"expires") is not None


def freshness_lifetime(
    status: int, headers: Headers, cc: CacheControl, response_time: float, config: RouteCacheConfig
) -> float:
    """RFC 9111 4.2.1: s-maxage, then max-age, then Expires - Date; then the route's default
    TTL or the heuristic, for statuses cacheable by default; capped by `max_ttl_s`."""
    lifetime = _lifetime(status, headers, cc, response_time, config)
    if config.max_ttl_s is not None:
        lifetime = min(lifetime, config.max_ttl_s)
    return max(0.0, lifetime)


def _lifetime(
    status: int, headers: Headers, cc: CacheControl, response_time: float, config: RouteCacheConfig
) -> float:
    if cc.has("no-cache"):
        return 0.0  # stored, but every use is revalidated (RFC 9111 5.2.2.4)
    for name in ("s-maxage", "max-age"):
        seconds = cc.seconds(name)
        if seconds is not None:
            return 0.0 if seconds == INVALID else float(seconds)
    expires_raw = header_value(headers, b"expires")
    if expires_raw is not None:
        expires = parse_http_date(expires_raw)
        if expires is None:
            return 0.0  # RFC 9111 5.3: an invalid Expires means already expired
        date = parse_http_date(header_value(headers, b"date"))
        return expires - (date if date is not None else response_time)
    if status not in HEURISTIC_STATUSES:
        return 0.0
    if config.default_ttl_s is not None:
        return config.default_ttl_s
    if config.heuristic:
        last_modified = parse_http_date(header_value(headers, b"last-modified"))
        date = parse_http_date(header_value(headers, b"date"))
        if last_modified is not None:
            since = (date if date is not None else response_time) - last_modified
            return min(HEURISTIC_MAX_S, max(0.0, since * HEURISTIC_FRACTION))
    return 0.0


def initial_age(headers: Headers, request_time: float, response_time: float) -> float:
    """RFC 9111 4.2.3 corrected_initial_age: the larger of the apparent age (Date) and the
    Age header plus the response delay. An unreadable Age is ignored (5.1)."""
    age_value = 0.0
    raw = header_value(headers, b"age")
    if raw is not None and raw.strip().isdigit():
        age_value = float(int(raw.strip()))
    date = parse_http_date(header_value(headers, b"date"))
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    return max(apparent, age_value + max(0.0, response_time - request_time))


def _kept_after_stale_s(no_stale: bool, swr_s: float, sie_s: float, has_validator: bool) -> float:
    """How long past its freshness an entry is still worth keeping: its longest stale window,
    or long enough to revalidate with when it has a validator."""
    windows = 0.0 if no_stale else max(swr_s, sie_s)
    return max(windows, VALIDATOR_KEEP_S) if has_validator else windows


_FRESHNESS_AND_VALIDATOR_FIELDS = frozenset({b"expires", b"etag", b"last-modified"})


def _no_stale(cc: CacheControl) -> bool:
    return any(cc.has(d) for d in ("must-revalidate", "proxy-revalidate", "s-maxage", "no-cache"))


def never_usable(
    status: int, headers: Headers, cc: CacheControl, response_time: float, config: RouteCacheConfig
) -> bool:
    """No request could ever be answered from this response: no freshness, no stale window and
    no validator. Decided without building the entry: the usual uncacheable response costs the
    miss path nothing more."""
    if (
        not cc.directives
        and not config.stale_while_revalidate_s
        and not config.stale_if_error_s
        and (config.default_ttl_s is None or status not in HEURISTIC_STATUSES)
    ):
        # The usual API response, decided in one pass: no caching fields at all (Expires and
        # the validators included, and so no heuristic), on a route that adds no freshness.
        for name, _ in headers:
            if name in _FRESHNESS_AND_VALIDATOR_FIELDS:
                break
        else:
            return True
    if freshness_lifetime(status, headers, cc, response_time, config) > 0:
        return False
    has_validator = (
        header_value(headers, b"etag") is not None or header_value(headers, b"last-modified") is not None
    )
    swr_s = _window(cc, "stale-while-revalidate", config.stale_while_revalidate_s)
    sie_s = _window(cc, "stale-if-error", config.stale_if_error_s)
    return _kept_after_stale_s(_no_stale(cc), swr_s, sie_s, has_validator) <= 0


def _window(cc: CacheControl, name: str, configured_s: float) -> float:
    seconds = cc.seconds(name)
    if seconds is None:
        return configured_s
    return 0.0 if seconds == INVALID else float(seconds)


def build_entry(
    *,
    key: str,
    url_key: str,
    target: bytes,
    request_headers: Headers,
    status: int,
    reason: bytes,
    headers: Headers,
    body: bytes,
    request_time: float,
    response_time: float,
    config: RouteCacheConfig,
) -> CachedEntry:
    """The entry for a storable response (check `not_stored_reason` first)."""
    cc = cache_control(headers)
    stored = [(n, v) for n, v in headers if n not in _NOT_STORED]
    if status != 204:  # RFC 9110 8.6: a 204 never carries Content-Length
        stored.append((b"content-length", str(len(body)).encode()))
    no_stale = _no_stale(cc)
    return CachedEntry(
        key=key,
        url_key=url_key,
        target=target,
        status=status,
        reason=reason,
        headers=tuple(stored),
        body=body,
        response_time=response_time,
        initial_age_s=initial_age(headers, request_time, response_time),
        lifetime_s=freshness_lifetime(status, headers, cc, response_time, config),
        swr_s=_window(cc, "stale-while-revalidate", config.stale_while_revalidate_s),
        sie_s=_window(cc, "stale-if-error", config.stale_if_error_s),
        no_stale=no_stale,
        credentials_ok=credentials_allowed(cc),
        vary=tuple((name.encode(), _joined(request_headers, name.encode())) for name in vary_names(headers)),
    )


def _joined(headers: Headers, name: bytes) -> bytes | None:
    values = [v for n, v in headers if n == name]
    return b", ".join(values) if values else None


def vary_matches(entry: CachedEntry, request_headers: Headers) -> bool:
    """RFC 9111 4.1: every Vary'd header has the value the entry was stored for."""
    return all(_joined(request_headers, name) == value for name, value in entry.vary)


def freshness(entry: CachedEntry, now: float, *, revalidate: bool = False) -> Freshness:
    """What may be done with an entry now. `revalidate`: the client asked for a check."""
    ttl = entry.ttl_s(now)
    if ttl > 0 and not revalidate:
        return Freshness.FRESH
    if not revalidate and not entry.no_stale and -ttl < entry.swr_s:
        return Freshness.STALE_WHILE_REVALIDATE
    return Freshness.STALE


def usable_on_error(entry: CachedEntry, now: float) -> bool:
    """RFC 5861 stale-if-error / RFC 9111 4.2.4: may this stale entry answer when the
    upstream failed (or cannot be asked)? A fresh entry always may."""
    ttl = entry.ttl_s(now)
    return ttl > 0 or (not entry.no_stale and -ttl < entry.sie_s)


def not_modified(request_headers: Headers, response: Sequence[tuple[bytes, bytes]]) -> bool:
    """RFC 9110 13.1.2/13.1.3 for the client's own GET/HEAD against a (stored) response's
    headers: If-None-Match (weak comparison) wins; If-Modified-Since only without it."""
    inm: list[bytes] = []
    since_raw: bytes | None = None
    for name, value in request_headers:
        if name == b"if-none-match":
            inm.append(value)
        elif name == b"if-modified-since" and since_raw is None:
            since_raw = value
    if inm:
        etag = _first(response, b"etag")
        tags = [t for value in inm for t in entity_tags(value)]
        if b"*" in tags:
            return True
        return etag is not None and any(weak_match(t, etag) for t in tags)
    if since_raw is None:
        return False  # the usual request: no conditional at all
    since = parse_http_date(since_raw)
    if since is None:
        return False
    modified = parse_http_date(_first(response, b"last-modified"))
    return modified is not None and modified <= since


def _first(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


# RFC 9110 15.4.5: a 304 carries the fields a 200 would have had among these.
_NOT_MODIFIED_FIELDS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)


def not_modified_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    return [(n, v) for n, v in headers if n in _NOT_MODIFIED_FIELDS or n == b"last-modified"]


def revalidation_headers(request_headers: Headers, entry: CachedEntry) -> Headers:
    """The request headers for a conditional request validating `entry` (RFC 9111 4.3.1):
    the client's own conditionals replaced by the stored validators."""
    out = [(n, v) for n, v in request_headers if n not in CONDITIONAL_HEADERS]
    etag = entry.header(b"etag")
    if etag is not None:
        out.append((b"if-none-match", etag))
    last_modified = entry.header(b"last-modified")
    if last_modified is not None:
        out.append((b"if-modified-since", last_modified))
    return out


def has_validators(entry: CachedEntry) -> bool:
    return entry.header(b"etag") is not None or entry.header(b"last-modified") is not None


def merge_not_modified(
    entry: CachedEntry,
    headers: Headers,
    *,
    request_time: float,
    response_time: float,
    config: RouteCacheConfig,
) -> CachedEntry:
    """RFC 9111 4.3.4: a 304 refreshes the stored entry: its header fields replace the stored
    ones (framing and content fields excepted), and freshness starts again from it."""
    updates = [(n, v) for n, v in headers if n not in _NOT_UPDATED]
    names = {n for n, _ in updates}
    merged = [(n, v) for n, v in entry.headers if n not in names] + updates
    cc = cache_control(merged)
    no_stale = any(cc.has(d) for d in ("must-revalidate", "proxy-revalidate", "s-maxage", "no-cache"))
    return replace(
        entry,
        headers=tuple(merged),
        response_time=response_time,
        initial_age_s=initial_age(headers, request_time, response_time),
        lifetime_s=freshness_lifetime(entry.status, merged, cc, response_time, config),
        swr_s=_window(cc, "stale-while-revalidate", config.stale_while_revalidate_s),
        sie_s=_window(cc, "stale-if-error", config.stale_if_error_s),
        no_stale=no_stale,
        credentials_ok=credentials_allowed(cc),
    )


@final
class KeyBuilder:
    """Entry keys for one route: a hash of the route, the target, the credential partition,
    the values of the configured key headers and of the override headers frameworks act on
    (so a primed entry never answers a plain request). One pass over the request headers and
    one hash per request: this runs on every hit. No raw client input or credential in a key."""

    __slots__ = ("_names", "_none_found", "_route_hash", "_url_hash", "_wanted")

    def __init__(self, route: str, key_headers: Sequence[bytes]) -> None:
        # Keys are fingerprint([route, target, partition, *markers], domain=b"cache") and URL
        # keys fingerprint([route, target, partition], domain=b"cache-url"), computed with the
        # route hashed once, and the markers of a request without any of the headers (the
        # usual one) encoded once.
        route_part = encode_parts([route.encode()])
        self._route_hash = hashlib.blake2b(b"cache", digest_size=16)
        self._route_hash.update(route_part)
        self._url_hash = hashlib.blake2b(b"cache-url", digest_size=16)
        self._url_hash.update(route_part)
        self._names = (*key_headers, *UNKEYED_OVERRIDES)
        self._wanted = frozenset(self._names)
        self._none_found = encode_parts([b"\x00"] * len(self._names))

    def key(self, target: bytes, partition: str, headers: Headers) -> str:
        wanted = self._wanted
        found: dict[bytes, bytes] | None = None
        for name, value in headers:
            if name in wanted:
                if found is None:
                    found = {}
                found[name] = found[name] + b", " + value if name in found else value
        if found is None:
            markers = self._none_found
        else:
            markers = encode_parts(
                [b"\x00" if (seen := found.get(name)) is None else b"=" + seen for name in self._names]
            )
        h = self._route_hash.copy()
        h.update(_target_and_partition(target, partition) + markers)
        return h.hexdigest()

    def url(self, target: bytes, partition: str) -> str:
        """Every variant of one URL on this route and credential: what invalidation removes."""
        h = self._url_hash.copy()
        h.update(_target_and_partition(target, partition))
        return h.hexdigest()


def _target_and_partition(target: bytes, partition: str) -> bytes:
    encoded = partition.encode()
    return len(target).to_bytes(4, "big") + target + len(encoded).to_bytes(4, "big") + encoded


def response_headers(entry: CachedEntry, now: float) -> Headers:
    """The stored headers plus `Age` (RFC 9111 5.1: on every response from the cache)."""
    return [*entry.headers, (b"age", str(int(entry.age_s(now))).encode())]


def same_origin_paths(headers: Headers, authority: bytes) -> list[bytes]:
    """RFC 9111 4.4: Location and Content-Location targets to invalidate too, only when they
    are on the same origin (a relative reference or our authority)."""
    out: list[bytes] = []
    for name in (b"location", b"content-location"):
        value = header_value(headers, name)
        if not value:
            continue
        if value.startswith(b"/") and not value.startswith(b"//"):
            out.append(value)
            continue
        for scheme in (b"http://", b"https://"):
            if value.lower().startswith(scheme):
                rest = value[len(scheme) :]
                host, slash, path = rest.partition(b"/")
                if host.lower() == authority.lower():
                    out.append(slash + path if slash else b"/")
    return out


def hit_status(ttl_s: float) -> bytes:
    """`cache_status(hit=True, ttl_s=ttl_s)`, memoised per whole second: every hit sends one."""
    return _hit_status(math.floor(ttl_s))


@functools.lru_cache(maxsize=4096)
def _hit_status(ttl: int) -> bytes:
    return cache_status(hit=True, ttl_s=ttl)


def cache_status(
    *,
    hit: bool = False,
    fwd: str | None = None,
    fwd_status: int | None = None,
    ttl_s: float | None = None,
    stored: bool = False,
    collapsed: bool = False,
    detail: str | None = None,
) -> bytes:
    """An RFC 9211 Cache-Status member for this cache, e.g. `resilient-ambassador; hit; ttl=12`."""
    parts = ["resilient-ambassador"]
    if hit:
        parts.append("hit")
    if fwd is not None:
        parts.append(f"fwd={fwd}")
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status}")
    if ttl_s is not None:
        parts.append(f"ttl={math.floor(ttl_s)}")
    if stored:
        parts.append("stored")
    if collapsed:
        parts.append("collapsed")
    if detail is not None:
        parts.append(f"detail={detail}")
    return "; ".join(parts).encode()
