"""Parsing the header fields a cache decides on: Cache-Control, Vary, HTTP dates, ETags.

Lenient, as RFC 9111 asks of recipients: directive names are case-insensitive, values may be
quoted (5.2: "SHOULD accept both forms"), unknown directives are ignored, and anything that
cannot be read is resolved the restrictive way (an invalid or conflicting `max-age` makes the
response stale, 4.2.1; an invalid `Expires` means already expired, 5.3). Pure: no clock here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime
from typing import final

from resilient_ambassador.core.messages import Headers

# RFC 9111 1.2.2: a delta-seconds too large to represent is taken as 2^31.
MAX_DELTA_S = 2**31
# A directive value that could not be read: callers treat it as 0 (stale), the safe side.
INVALID = -1


@final
@dataclass(frozen=True, slots=True)
class CacheControl:
    """Directives (lower-case names) with their unquoted values (None when bare).

    A directive given twice with different values is kept as `INVALID` for the delta-seconds
    ones (RFC 9111 4.2.1: use the first "or consider the response stale"; we pick stale)."""

    directives: dict[str, str | None]

    def has(self, name: str) -> bool:
        return name in self.directives

    def seconds(self, name: str) -> int | None:
        """A delta-seconds directive: None when absent, `INVALID` when unreadable."""
        if name not in self.directives:
            return None
        return parse_delta_seconds(self.directives[name])


def split_list(values: Iterable[bytes]) -> list[str]:
    """The members of a comma-separated list field (RFC 9110 5.6.1), across all field lines,
    keeping commas inside quoted strings; empty members dropped."""
    out: list[str] = []
    for raw in values:
        text = raw.decode("latin-1")
        member: list[str] = []
        quoted = escaped = False
        for ch in text:
            if escaped:
                escaped = False
            elif quoted and ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = not quoted
            elif ch == "," and not quoted:
                out.append("".join(member).strip())
                member = []
                continue
            member.append(ch)
        out.append("".join(member).strip())
    return [m for m in out if m]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        return inner.replace('\\"', '"').replace("\\\\", "\\")
    return value


def parse_cache_control(values: Iterable[bytes]) -> CacheControl:
    directives: dict[str, str | None] = {}
    for member in split_list(values):
        name, eq, value = member.partition("=")
        name = name.strip().lower()
        if not name:
            continue
        parsed = _unquote(value.strip()) if eq else None
        if name in directives:
            if directives[name] != parsed:
                # Conflicting duplicates: a delta-seconds one becomes unreadable (stale);
                # for the others presence is all that matters.
                directives[name] = "invalid"
            continue
        directives[name] = parsed
    return CacheControl(directives)


def parse_delta_seconds(value: str | None) -> int:
    """RFC 9111 1.2.2 delta-seconds; `INVALID` when missing or not digits."""
    if value is None or not value.isascii() or not value.isdigit():
        return INVALID
    return min(int(value), MAX_DELTA_S)


NO_DIRECTIVES = CacheControl({})  # shared: nothing mutates a parsed CacheControl


def cache_control(headers: Headers) -> CacheControl:
    values = [v for n, v in headers if n == b"cache-control"]
    return parse_cache_control(values) if values else NO_DIRECTIVES


def parse_http_date(value: bytes | None) -> float | None:
    """An HTTP-date (RFC 9110 5.6.7, all three historic forms) as a POSIX timestamp; None if
    absent or invalid."""
    if value is None:
        return None
    try:
        parsed = parsedate_to_datetime(value.decode("latin-1").strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:  # RFC 850 and asctime dates carry no zone: they are GMT
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def format_http_date(timestamp: float) -> bytes:
    return formatdate(timestamp, usegmt=True).encode("ascii")


def vary_names(headers: Headers) -> tuple[str, ...]:
    """Lower-case field names in Vary, sorted and deduplicated; ("*",) when it has `*`."""
    names = {m.lower() for m in split_list(v for n, v in headers if n == b"vary")}
    if "*" in names:
        return ("*",)
    return tuple(sorted(names))


def entity_tags(value: bytes) -> list[bytes]:
    """The entity tags of an If-None-Match value, or [b"*"]."""
    return [m.encode("latin-1") for m in split_list([value])]


def weak_match(a: bytes, b: bytes) -> bool:
    """RFC 9110 8.8.3.2 weak comparison: equal opaque tags, ignoring W/ on either side."""
    return a.removeprefix(b"W/") == b.removeprefix(b"W/")
