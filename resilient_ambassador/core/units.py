"""Parsers for the human units in config files and flags: durations, sizes and rates.

They take the text as written (the config loader hands over a YAML scalar's raw text, so the
YAML 1.1 oddities such as `1:30` meaning 90 never apply) and raise `ValueError` with a message
that shows the expected form, for the caller to prefix with a key path or a flag name.
"""

from __future__ import annotations

import re

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION_RE = re.compile(_NUMBER + r"\s*(ms|s|m|h)?")
_SIZE_RE = re.compile(r"(\d+)\s*([KMG]i?B|B)?", re.IGNORECASE)
_RATE_RE = re.compile(_NUMBER + r"\s*/\s*(\S+)")

_SECONDS_PER = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_BYTES_PER = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
}


def parse_duration(text: str) -> float:
    """Seconds from `250ms`, `2s`, `1.5s`, `5m` or `1h`; a bare number means seconds."""
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError("expected a duration like 250ms, 2s, 5m")
    return float(m[1]) * _SECONDS_PER[m[2] or "s"]


def parse_size(text: str) -> int:
    """Bytes from `512B`, `64KiB`, `1MiB`, `1GiB` or `10KB` (SI: 10 * 1000); a bare integer
    means bytes. Whole numbers only, so a size is always an exact byte count."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError("expected a size like 64KiB, 1MiB")
    return int(m[1]) * _BYTES_PER[(m[2] or "B").upper()]


def parse_rate(text: str) -> tuple[float, float]:
    """`(count, per_seconds)` from `10/s`, `600/m`, `10000/h`; the period may also be a
    duration (`100/10s`). Kept as a pair so `600/m` does not become a lossy 10/s."""
    m = _RATE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError("expected a rate like 10/s, 600/m, 10000/h")
    period = m[2] if m[2][0] in "0123456789." else "1" + m[2]
    try:
        per_s = parse_duration(period)
    except ValueError:
        raise ValueError("expected a rate like 10/s, 600/m, 10000/h") from None
    count = float(m[1])
    if count <= 0 or per_s <= 0:
        raise ValueError("a rate needs a count and a period greater than 0")
    return count, per_s
