"""Durations, sizes and rates as written in config files and flags."""

from __future__ import annotations

import pytest

from resilient_ambassador.core.units import parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("30", 30.0),  # a bare YAML number means seconds
        ("2.5", 2.5),
        (" 10 s ", 10.0),
        ("0s", 0.0),  # the parser allows 0; callers decide whether 0 makes sense
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "2x", "-1s", "1:30", "2 secs", "1e3s", "inf", "nan", "2S"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected a duration like 250ms, 2s, 5m$"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512B", 512),
        ("64KiB", 64 * 1024),
        ("1MiB", 1024**2),
        ("1GiB", 1024**3),
        ("10KB", 10_000),  # SI: powers of 1000
        ("2MB", 2_000_000),
        ("1GB", 10**9),
        ("4096", 4096),  # a bare integer means bytes
        ("8kib", 8 * 1024),
        ("1 MiB", 1024**2),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "KiB", "1.5MiB", "-1KiB", "1TiB", "1Mi", "1 megabyte", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected a size like 64KiB, 1MiB$"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10/s", (10.0, 1.0)),
        ("600/m", (600.0, 60.0)),
        ("10000/h", (10000.0, 3600.0)),
        ("100/10s", (100.0, 10.0)),
        ("0.5/s", (0.5, 1.0)),
        ("5 / m", (5.0, 60.0)),
    ],
)
def test_parse_rate(text: str, rate: tuple[float, float]) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "10", "10/", "/s", "10/x", "10/day", "ten/s", "-1/s"])
def test_parse_rate_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected a rate like 10/s, 600/m, 10000/h$"):
        parse_rate(text)


@pytest.mark.parametrize("text", ["0/s", "10/0s"])
def test_parse_rate_rejects_zero(text: str) -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        parse_rate(text)
