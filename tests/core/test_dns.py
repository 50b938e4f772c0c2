"""DNS cache entries and connect order: pure, no sockets and no clock."""

from __future__ import annotations

import socket

import pytest

from resilient_ambassador.core.dns import Address, DNSEntry, DNSTimes, interleave_families, ip_literal

TIMES = DNSTimes(max_ttl_s=30.0, negative_ttl_s=2.0, max_stale_s=60.0)


def v4(ip: str) -> Address:
    return Address(socket.AF_INET, ip)


def v6(ip: str) -> Address:
    return Address(socket.AF_INET6, ip)


A, B, C = v4("10.0.0.1"), v4("10.0.0.2"), v4("10.0.0.3")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", v4("127.0.0.1")),
        ("::1", v6("::1")),
        ("2001:DB8::1", v6("2001:db8::1")),  # normalised
        ("localhost", None),
        ("api.default.svc", None),
        ("10.0.0.256", None),
    ],
)
def test_ip_literal(host: str, expected: Address | None) -> None:
    assert ip_literal(host) == expected


def test_sockaddr_per_family() -> None:
    assert v4("10.0.0.1").sockaddr(80) == ("10.0.0.1", 80)
    assert Address(socket.AF_INET6, "fe80::1", 3).sockaddr(443) == ("fe80::1", 443, 0, 3)
    assert str(v6("::1")) == "[::1]"


def test_positive_entry_lifetimes() -> None:
    entry = DNSEntry.positive([A, B, A], now=100.0, times=TIMES)

    assert entry.addresses == (A, B)  # duplicates (one per socket type) collapse
    assert entry.is_fresh(129.9)
    assert not entry.is_fresh(130.0)
    assert entry.can_serve_stale(189.9)
    assert not entry.can_serve_stale(190.0)


def test_negative_entry_is_short_and_never_stale() -> None:
    entry = DNSEntry.negative("Name or service not known", now=100.0, times=TIMES)

    assert entry.is_fresh(101.9)
    assert not entry.is_fresh(102.0)
    assert not entry.can_serve_stale(101.0)
    assert entry.connect_order() == []


def test_connect_order_rotates_over_the_addresses() -> None:
    entry = DNSEntry.positive([A, B, C], now=0.0, times=TIMES)

    assert [entry.connect_order()[0] for _ in range(4)] == [A, B, C, A]
    assert entry.connect_order() == [B, C, A]


def test_failed_addresses_go_last_until_they_connect_again() -> None:
    entry = DNSEntry.positive([A, B, C], now=0.0, times=TIMES)
    entry.report(A, ok=False)

    assert entry.connect_order() == [B, C, A]
    assert entry.connect_order() == [B, C, A]  # rotation at B
    assert entry.connect_order() == [C, B, A]
    entry.report(A, ok=True)
    assert entry.connect_order() == [A, B, C]


def test_refresh_keeps_what_the_entry_learned_for_addresses_still_there() -> None:
    old = DNSEntry.positive([A, B], now=0.0, times=TIMES)
    old.report(A, ok=False)
    old.report(B, ok=False)
    old.connect_order()

    new = DNSEntry.positive([B, C], now=30.0, times=TIMES, previous=old)

    assert new.failed == {B}  # A is gone from the answer
    assert new.next == old.next
    assert new.connect_order() == [C, B]


def test_report_ignores_addresses_not_in_the_answer() -> None:
    entry = DNSEntry.positive([A], now=0.0, times=TIMES)
    entry.report(B, ok=False)
    assert entry.failed == set()


def test_interleave_families_rfc_8305() -> None:
    x, y = v6("2001:db8::1"), v6("2001:db8::2")
    assert interleave_families([x, y, A, B, C]) == [x, A, y, B, C]
    assert interleave_families([A, B, x]) == [A, x, B]
    assert interleave_families([A, B]) == [A, B]
    assert interleave_families([]) == []


def test_connect_order_interleaves_within_each_group() -> None:
    x = v6("2001:db8::1")
    entry = DNSEntry.positive([x, A, B], now=0.0, times=TIMES)
    entry.report(x, ok=False)

    assert entry.connect_order() == [A, B, x]
