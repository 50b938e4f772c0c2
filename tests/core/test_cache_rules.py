"""RFC 9111 cache rules with explicit times: storability, freshness, age, stale windows,
conditionals, 304 merging, keys and Cache-Status."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_ambassador.core.cache_control import cache_control, format_http_date, parse_cache_control
from resilient_ambassador.core.cache_rules import (
    UNKEYED_OVERRIDES,
    CachedEntry,
    Freshness,
    KeyBuilder,
    build_entry,
    cache_status,
    freshness,
    initial_age,
    merge_not_modified,
    never_usable,
    not_modified,
    not_stored_reason,
    request_bypass_reason,
    response_headers,
    revalidation_headers,
    same_origin_paths,
    usable_on_error,
    vary_matches,
)
from resilient_ambassador.core.config import RouteCacheConfig
from resilient_ambassador.core.fingerprint import fingerprint
from resilient_ambassador.core.messages import Headers

NOW = 1_700_000_000.0
ON = RouteCacheConfig(enabled=True)


def date(offset_s: float) -> bytes:
    return format_http_date(NOW + offset_s)


def entry(
    headers: Headers,
    *,
    status: int = 200,
    config: RouteCacheConfig = ON,
    request: Headers | None = None,
    request_time: float = NOW,
    response_time: float = NOW,
) -> CachedEntry:
    return build_entry(
        key="k",
        url_key="u",
        target=b"/x",
        request_headers=list(request or []),
        status=status,
        reason=b"OK",
        headers=headers,
        body=b"body",
        request_time=request_time,
        response_time=response_time,
        config=config,
    )


def why_not(
    headers: Headers,
    *,
    status: int = 200,
    request: Headers | None = None,
    method: bytes = b"GET",
    config: RouteCacheConfig = ON,
) -> str | None:
    req = list(request or [])
    return not_stored_reason(method, req, cache_control(req), status, headers, cache_control(headers), config)


@pytest.mark.parametrize(
    ("headers", "status", "req", "expected"),
    [
        ([(b"cache-control", b"max-age=60")], 200, [], None),
        ([], 200, [], None),  # cacheable by default; lifetime 0 unless a TTL is configured
        ([(b"cache-control", b"no-store")], 200, [], "no-store"),
        ([(b"cache-control", b"max-age=60")], 200, [(b"cache-control", b"no-store")], "no-store"),
        ([(b"cache-control", b'private="x-a", max-age=60')], 200, [], "private"),
        ([(b"cache-control", b"max-age=60")], 200, [(b"authorization", b"Bearer a")], "authorization"),
        ([(b"cache-control", b"max-age=60")], 200, [(b"cookie", b"s=1")], "authorization"),
        ([(b"cache-control", b"public, max-age=60")], 200, [(b"authorization", b"Bearer a")], None),
        ([(b"cache-control", b"s-maxage=60")], 200, [(b"authorization", b"Bearer a")], None),
        ([(b"cache-control", b"max-age=60"), (b"set-cookie", b"a=b")], 200, [], "set-cookie"),
        ([(b"cache-control", b"max-age=60"), (b"vary", b"*")], 200, [], "vary-star"),
        ([(b"cache-control", b"max-age=60")], 206, [], "status"),
        ([(b"cache-control", b"max-age=60")], 500, [], "status"),
        ([], 302, [], "status"),  # not cacheable by default and no explicit freshness
        ([(b"cache-control", b"max-age=60")], 302, [], None),
        ([(b"cache-control", b"max-age=60")], 404, [], None),
    ],
)
def test_storability(headers: Headers, status: int, req: Headers, expected: str | None) -> None:
    assert why_not(headers, status=status, request=req) == expected


def test_head_responses_are_never_stored() -> None:
    assert why_not([(b"cache-control", b"max-age=60")], method=b"HEAD") == "method"


def test_stored_framing_comes_from_the_stored_body() -> None:
    stored = entry([(b"cache-control", b"max-age=60"), (b"content-length", b"999"), (b"age", b"3")])
    assert dict(stored.headers)[b"content-length"] == b"4"
    assert b"age" not in dict(stored.headers)
    no_content = entry([(b"cache-control", b"max-age=60")], status=204)
    assert b"content-length" not in dict(no_content.headers)


def test_set_cookie_stored_only_when_configured_and_never_replayed() -> None:
    headers = [(b"cache-control", b"max-age=60"), (b"set-cookie", b"a=b")]
    config = dataclasses.replace(ON, store_set_cookie=True)
    assert why_not(headers, config=config) is None
    assert b"set-cookie" not in dict(entry(headers, config=config).headers)


_DIRECTIVES = st.sampled_from(
    ["max-age=60", "s-maxage=10", "public", "must-revalidate", "no-cache", "stale-if-error=5", "immutable"]
)


@given(
    others=st.lists(_DIRECTIVES, max_size=4),
    forbidden=st.sampled_from(["no-store", "private", 'private="set-cookie"', "NO-STORE", 'no-store="x"']),
    position=st.integers(0, 4),
    status=st.sampled_from([200, 203, 301, 404, 410]),
    split_lines=st.booleans(),
)
def test_nothing_with_no_store_or_private_is_ever_stored(
    others: list[str], forbidden: str, position: int, status: int, split_lines: bool
) -> None:
    directives = [*others]
    directives.insert(min(position, len(directives)), forbidden)
    lines = [d.encode() for d in directives] if split_lines else [", ".join(directives).encode()]
    headers = [(b"cache-control", line) for line in lines]
    assert why_not(headers, status=status) in ("no-store", "private")


@pytest.mark.parametrize(
    ("headers", "config", "expected"),
    [
        ([(b"cache-control", b"max-age=60, s-maxage=30")], ON, 30.0),  # s-maxage wins (shared)
        ([(b"cache-control", b"max-age=60"), (b"expires", date(3600))], ON, 60.0),
        ([(b"date", date(0)), (b"expires", date(120))], ON, 120.0),
        ([(b"date", date(-100)), (b"expires", date(20))], ON, 120.0),  # Expires - Date
        ([(b"expires", b"0")], ON, 0.0),  # invalid Expires: already stale (5.3)
        ([(b"cache-control", b"max-age=60, max-age=30")], ON, 0.0),  # conflict: stale
        ([(b"cache-control", b"no-cache, max-age=60")], ON, 0.0),
        ([], ON, 0.0),  # no heuristic by default
        ([], dataclasses.replace(ON, default_ttl_s=30.0), 30.0),
        ([(b"cache-control", b"max-age=600")], dataclasses.replace(ON, max_ttl_s=10.0), 10.0),
        (
            [(b"date", date(0)), (b"last-modified", date(-1000))],
            dataclasses.replace(ON, heuristic=True),
            100.0,  # 10% of the time since Last-Modified
        ),
    ],
)
def test_freshness_lifetime(headers: Headers, config: RouteCacheConfig, expected: float) -> None:
    assert entry(headers, config=config).lifetime_s == pytest.approx(expected)


def test_current_age_per_rfc_9111_4_2_3() -> None:
    # Date 10 s before receipt, Age 3, request took 2 s: corrected initial age = max(10, 3+2).
    headers = [(b"date", date(-10)), (b"age", b"3")]
    assert initial_age(headers, NOW - 2, NOW) == 10.0
    assert initial_age([(b"age", b"30")], NOW - 2, NOW) == 32.0
    assert initial_age([(b"age", b"x")], NOW, NOW) == 0.0
    stored = entry([(b"cache-control", b"max-age=60"), (b"age", b"15")])
    assert stored.age_s(NOW + 5) == 20.0
    assert stored.ttl_s(NOW + 5) == 40.0
    assert response_headers(stored, NOW + 5)[-1] == (b"age", b"20")


def test_freshness_and_stale_windows() -> None:
    swr = entry([(b"cache-control", b"max-age=10, stale-while-revalidate=20, stale-if-error=100")])
    assert freshness(swr, NOW + 9) is Freshness.FRESH
    assert freshness(swr, NOW + 25) is Freshness.STALE_WHILE_REVALIDATE
    assert freshness(swr, NOW + 31) is Freshness.STALE
    assert freshness(swr, NOW + 1, revalidate=True) is Freshness.STALE
    assert usable_on_error(swr, NOW + 109)
    assert not usable_on_error(swr, NOW + 111)
    assert swr.storage_ttl_s(NOW) == 110.0
    # With a validator it is kept longer, to be revalidated with a 304 rather than refetched.
    assert entry([(b"cache-control", b"max-age=10"), (b"etag", b'"1"')]).storage_ttl_s(NOW) == 610.0


def test_config_windows_apply_unless_the_response_sets_its_own() -> None:
    config = dataclasses.replace(ON, stale_if_error_s=50.0, stale_while_revalidate_s=5.0)
    assert entry([(b"cache-control", b"max-age=1")], config=config).sie_s == 50.0
    assert entry([(b"cache-control", b"max-age=1, stale-if-error=7")], config=config).sie_s == 7.0


@pytest.mark.parametrize("directive", [b"must-revalidate", b"proxy-revalidate", b"s-maxage=1", b"no-cache"])
def test_revalidation_directives_forbid_stale_serving(directive: bytes) -> None:
    config = dataclasses.replace(ON, stale_if_error_s=50.0, stale_while_revalidate_s=50.0)
    stored = entry([(b"cache-control", b"max-age=1, stale-if-error=60, " + directive)], config=config)
    assert freshness(stored, NOW + 2) is Freshness.STALE
    assert not usable_on_error(stored, NOW + 2)


def test_client_conditionals() -> None:
    stored = entry([(b"etag", b'"v1"'), (b"last-modified", date(-100))])
    assert not_modified([(b"if-none-match", b'W/"v1"')], stored.headers)
    assert not_modified([(b"if-none-match", b'"x", "v1"')], stored.headers)
    assert not_modified([(b"if-none-match", b"*")], stored.headers)
    assert not not_modified([(b"if-none-match", b'"v2"')], stored.headers)
    assert not_modified([(b"if-modified-since", date(-50))], stored.headers)
    assert not not_modified([(b"if-modified-since", date(-150))], stored.headers)
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
    assert not not_modified([(b"if-none-match", b'"v2"'), (b"if-modified-since", date(0))], stored.headers)


def test_revalidation_request_uses_stored_validators() -> None:
    stored = entry([(b"etag", b'"v1"'), (b"last-modified", date(-100))])
    headers = revalidation_headers([(b"accept", b"*/*"), (b"if-none-match", b'"client"')], stored)
    assert headers == [(b"accept", b"*/*"), (b"if-none-match", b'"v1"'), (b"if-modified-since", date(-100))]


def test_304_updates_headers_and_restarts_freshness() -> None:
    stored = entry(
        [(b"cache-control", b"max-age=10"), (b"etag", b'"v1"'), (b"x-a", b"old"), (b"content-type", b"t")]
    )
    merged = merge_not_modified(
        stored,
        [(b"cache-control", b"max-age=100"), (b"x-a", b"new"), (b"content-length", b"0")],
        request_time=NOW + 50,
        response_time=NOW + 50,
        config=ON,
    )
    fields = dict(merged.headers)
    assert (fields[b"x-a"], fields[b"etag"], fields[b"content-length"]) == (b"new", b'"v1"', b"4")
    assert merged.lifetime_s == 100.0
    assert merged.ttl_s(NOW + 60) == 90.0
    assert merged.body == b"body"


def test_vary_matching() -> None:
    stored = entry([(b"vary", b"Accept-Encoding")], request=[(b"accept-encoding", b"gzip")])
    assert vary_matches(stored, [(b"accept-encoding", b"gzip")])
    assert not vary_matches(stored, [(b"accept-encoding", b"br")])
    assert not vary_matches(stored, [])


def test_keys_hide_input_and_separate_partitions_and_headers() -> None:
    evil = b"/v1/x%0d%0a* ?[]" + bytes(range(128, 256))
    plain = KeyBuilder("r", [])
    key = plain.key(evil, "", [])
    assert len(key) == 32
    assert set(key) <= set("0123456789abcdef")
    assert plain.key(b"/x", "cred-a", []) != plain.key(b"/x", "cred-b", [])
    assert plain.key(b"/x", "", []) != KeyBuilder("r2", []).key(b"/x", "", [])
    assert plain.url(b"/x", "cred-a") != plain.url(b"/x", "cred-b")
    user = KeyBuilder("r", [b"x-user"])
    assert user.key(b"/x", "", [(b"x-user", b"1")]) != user.key(b"/x", "", [(b"x-user", b"2")])
    assert user.key(b"/x", "", [(b"x-user", b"")]) != user.key(b"/x", "", [])
    assert user.key(b"/x", "", [(b"x-user", b"a"), (b"x-user", b"b")]) == user.key(
        b"/x", "", [(b"x-user", b"a, b")]
    )
    # Override headers a framework may act on always join the key (cache poisoning).
    assert plain.key(b"/x", "", [(b"x-original-url", b"/admin")]) != plain.key(b"/x", "", [])


def test_keys_stay_the_fingerprint_of_their_parts() -> None:
    # Pods of two versions share a Redis cache during a rolling upgrade: the key formula is fixed.
    user = KeyBuilder("r", [b"x-user"])
    absent = [b"\x00"] * len(UNKEYED_OVERRIDES)
    assert user.key(b"/x", "p", [(b"x-user", b"a")]) == fingerprint(
        [b"r", b"/x", b"p", b"=a", *absent], domain=b"cache"
    )
    assert user.key(b"/x", "", []) == fingerprint([b"r", b"/x", b"", b"\x00", *absent], domain=b"cache")
    assert user.url(b"/x", "p") == fingerprint([b"r", b"/x", b"p"], domain=b"cache-url")


def test_request_bypass() -> None:
    assert request_bypass_reason(b"GET", []) is None
    assert request_bypass_reason(b"HEAD", []) is None
    assert request_bypass_reason(b"POST", []) == "method"
    assert request_bypass_reason(b"GET", [(b"range", b"bytes=0-1")]) == "request"


def test_same_origin_invalidation_targets() -> None:
    headers = [(b"location", b"https://API.example:8443/a?b"), (b"content-location", b"/c")]
    assert same_origin_paths(headers, b"api.example:8443") == [b"/a?b", b"/c"]
    assert same_origin_paths([(b"location", b"https://evil.example/a")], b"api.example") == []
    assert same_origin_paths([(b"location", b"//evil.example/a")], b"api.example") == []


def test_cache_status_values() -> None:
    assert cache_status(hit=True, ttl_s=12.7) == b"resilient-ambassador; hit; ttl=12"
    assert cache_status(fwd="uri-miss", stored=True) == b"resilient-ambassador; fwd=uri-miss; stored"
    assert (
        cache_status(fwd="stale", fwd_status=503, ttl_s=-0.5, detail="stale-if-error")
        == b"resilient-ambassador; fwd=stale; fwd-status=503; ttl=-1; detail=stale-if-error"
    )


def test_parse_helper_used_by_requests() -> None:
    assert parse_cache_control([b"no-cache"]).has("no-cache")


@pytest.mark.parametrize(
    ("headers", "route", "never"),
    [
        ([], ON, True),  # no freshness, no stale window, no validator: the usual API answer
        ([(b"cache-control", b"max-age=60")], ON, False),
        ([(b"etag", b'"v1"')], ON, False),  # kept to revalidate with
        ([(b"expires", b"Thu, 01 Jan 2099 00:00:00 GMT")], ON, False),
        ([(b"content-type", b"application/json"), (b"x-other", b"1")], ON, True),
        ([(b"last-modified", b"Mon, 23 Nov 2026 10:00:00 GMT")], ON, False),
        ([(b"cache-control", b"stale-if-error=60")], ON, False),
        ([(b"cache-control", b"must-revalidate, stale-if-error=60")], ON, True),  # no stale use
        ([], dataclasses.replace(ON, default_ttl_s=30.0), False),
        ([], dataclasses.replace(ON, stale_if_error_s=30.0), False),
    ],
)
def test_never_usable_agrees_with_the_entry_it_would_build(
    headers: Headers, route: RouteCacheConfig, never: bool
) -> None:
    assert never_usable(200, headers, cache_control(headers), NOW, route) is never
    built = entry(headers, config=route)
    assert (built.storage_ttl_s(NOW) <= 0) is never
