"""The pure side of upstream name resolution: resolved addresses, cache entries with their
lifetimes (fresh, stale, negative), and the order in which a connect tries the addresses.

`net.resolver` does the lookups and the connects; everything here takes `now` as an argument.
getaddrinfo gives no TTL, so a positive answer lives `max_ttl_s` (like nginx's `resolver
valid=`), may then be served stale for `max_stale_s` while one background refresh runs (or
after it failed), and a failure is remembered `negative_ttl_s`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import final


@final
@dataclass(frozen=True, slots=True)
class Address:
    """One A or AAAA record: where to connect, without the port (the URL gives it)."""

    family: int  # socket.AF_INET or socket.AF_INET6
    ip: str
    scope_id: int = 0  # IPv6 link-local zone; 0 otherwise

    def sockaddr(self, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
        if self.family == socket.AF_INET6:
            return (self.ip, port, 0, self.scope_id)
        return (self.ip, port)

    def __str__(self) -> str:
        return f"[{self.ip}]" if self.family == socket.AF_INET6 else self.ip


def ip_literal(host: str) -> Address | None:
    """The address when `host` is an IP literal (which bypasses the resolver), else None."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Address(family, str(ip))


@final
@dataclass(frozen=True, slots=True)
class DNSTimes:
    """The cache's lifetimes (from `DNSConfig`), in seconds."""

    max_ttl_s: float
    negative_ttl_s: float
    max_stale_s: float


@final
@dataclass(slots=True)
class DNSEntry:
    """The cached answer for one name: its addresses, or the error when the lookup failed
    (a negative entry). Mutable: the round-robin position and the addresses that failed to
    connect change between lookups."""

    addresses: tuple[Address, ...]
    error: str | None
    fresh_until: float
    stale_until: float  # == fresh_until for a negative entry: never served stale
    retry_at: float = 0.0  # no background refresh before this (the last one failed)
    next: int = 0  # round-robin position
    failed: set[Address] = field(default_factory=set)  # last connect to them failed

    @classmethod
    def positive(
        cls, addresses: Sequence[Address], now: float, times: DNSTimes, previous: DNSEntry | None = None
    ) -> DNSEntry:
        """A fresh answer. What `previous` learned (round-robin position, addresses that
        failed) is kept for the addresses still in the answer."""
        unique = tuple(dict.fromkeys(addresses))
        fresh_until = now + times.max_ttl_s
        entry = cls(unique, None, fresh_until, fresh_until + times.max_stale_s)
        if previous is not None:
            entry.next = previous.next
            entry.failed = previous.failed & set(unique)
        return entry

    @classmethod
    def negative(cls, error: str, now: float, times: DNSTimes) -> DNSEntry:
        until = now + times.negative_ttl_s
        return cls((), error, until, until)

    def is_fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def can_serve_stale(self, now: float) -> bool:
        return bool(self.addresses) and now < self.stale_until

    def connect_order(self) -> list[Address]:
        """The addresses in the order a connect tries them, advancing the round-robin
        position: addresses that connected (or were never tried) first, rotated so that
        successive connections spread over all of them; those whose last connect failed go
        last. Each group is interleaved by family (RFC 8305 section 4), so an unreachable
        IPv6 path costs one stagger delay, not one per AAAA record."""
        start = self.next % len(self.addresses) if self.addresses else 0
        self.next += 1
        rotated = self.addresses[start:] + self.addresses[:start]
        good = [a for a in rotated if a not in self.failed]
        bad = [a for a in rotated if a in self.failed]
        return interleave_families(good) + interleave_families(bad)

    def report(self, address: Address, ok: bool) -> None:
        if ok:
            self.failed.discard(address)
        elif address in self.addresses:
            self.failed.add(address)


def interleave_families(addresses: Iterable[Address]) -> list[Address]:
    """Alternate address families, starting with the family of the first address and keeping
    each family's own order (RFC 8305 section 4)."""
    addresses = list(addresses)
    if not addresses:
        return []
    first = addresses[0].family
    mine = [a for a in addresses if a.family == first]
    other = [a for a in addresses if a.family != first]
    out: list[Address] = []
    for i in range(max(len(mine), len(other))):
        out.extend(group[i] for group in (mine, other) if i < len(group))
    return out
