"""Cache-Control, dates and entity tags, parsed leniently (RFC 9111 5.2, 4.2.1; RFC 9110 5.6)."""

from __future__ import annotations

import pytest

from resilient_ambassador.core.cache_control import (
    INVALID,
    MAX_DELTA_S,
    entity_tags,
    format_http_date,
    parse_cache_control,
    parse_http_date,
    vary_names,
    weak_match,
)

# RFC 9110 5.6.7's example date, in its three forms.
SUNDAY = 784111777.0


@pytest.mark.parametrize(
    ("lines", "name", "expected"),
    [
        ([b"max-age=60"], "max-age", 60),
        ([b"Max-Age=60"], "max-age", 60),  # directive names are case-insensitive
        ([b'max-age="60"'], "max-age", 60),  # quoted form accepted (5.2)
        ([b"public, max-age=60", b"s-maxage=5"], "s-maxage", 5),  # across field lines
        ([b"max-age=60, max-age=60"], "max-age", 60),  # an identical duplicate is harmless
        ([b"max-age=60, max-age=10"], "max-age", INVALID),  # conflicting: stale (4.2.1)
        ([b"max-age=abc"], "max-age", INVALID),
        ([b"max-age=-1"], "max-age", INVALID),
        ([b"max-age"], "max-age", INVALID),
        ([b"max-age=99999999999999"], "max-age", MAX_DELTA_S),  # 1.2.2: capped at 2^31
        ([b"no-cache"], "max-age", None),
    ],
)
def test_delta_seconds(lines: list[bytes], name: str, expected: int | None) -> None:
    assert parse_cache_control(lines).seconds(name) == expected


def test_quoted_commas_do_not_split_directives() -> None:
    cc = parse_cache_control([b'no-cache="set-cookie, x-a", private, ,max-age=3'])
    assert cc.directives == {"no-cache": "set-cookie, x-a", "private": None, "max-age": "3"}


@pytest.mark.parametrize(
    "value",
    [b"Sun, 06 Nov 1994 08:49:37 GMT", b"Sunday, 06-Nov-94 08:49:37 GMT", b"Sun Nov  6 08:49:37 1994"],
)
def test_http_dates_in_all_three_forms(value: bytes) -> None:
    assert parse_http_date(value) == SUNDAY


@pytest.mark.parametrize("value", [None, b"", b"0", b"-1", b"yesterday", b"Sun, 99 Nov 1994 08:49:37 GMT"])
def test_invalid_dates_are_none(value: bytes | None) -> None:
    assert parse_http_date(value) is None


def test_format_round_trips() -> None:
    assert format_http_date(SUNDAY) == b"Sun, 06 Nov 1994 08:49:37 GMT"


def test_vary_names_are_sorted_lower_case_and_star_wins() -> None:
    assert vary_names([(b"vary", b"Accept-Encoding, accept"), (b"vary", b"X-A")]) == (
        "accept",
        "accept-encoding",
        "x-a",
    )
    assert vary_names([(b"vary", b"accept, *")]) == ("*",)


def test_entity_tags_and_weak_comparison() -> None:
    assert entity_tags(b'"a", W/"b",  "c,d"') == [b'"a"', b'W/"b"', b'"c,d"']
    assert weak_match(b'W/"1"', b'"1"')
    assert not weak_match(b'"1"', b'"2"')
