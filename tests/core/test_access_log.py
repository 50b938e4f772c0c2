from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from resilient_ambassador.core.access_log import (
    MAX_LOGGED_PATH,
    AccessRecord,
    redact_target,
    scrub,
    to_json,
    to_text,
)
from resilient_ambassador.core.messages import Outcome


def _record(target: bytes = b"/", **fields: object) -> AccessRecord:
    base: dict[str, object] = {
        "time": 0.5,
        "listener": "main",
        "client_ip": b"10.0.0.1",
        "method": b"GET",
        "target": target,
        "status": 200,
        "bytes_sent": 3,
        "duration_s": 0.0123,
    }
    base.update(fields)
    return AccessRecord(**base)  # type: ignore[arg-type]


def test_credential_like_query_values_are_redacted() -> None:
    assert (
        redact_target(b"/m?api_key=k&page=2&Token=t&sig=s")
        == "/m?api_key=REDACTED&page=2&Token=REDACTED&sig=REDACTED"
    )
    assert redact_target(b"/m?X-Goog-Signature=abc") == "/m?X-Goog-Signature=REDACTED"
    assert redact_target(b"/m?page=2&flag&q=") == "/m?page=2&flag&q="
    assert redact_target(b"/m?custom=v", extra_names={"custom"}) == "/m?custom=REDACTED"


def test_long_targets_are_cut() -> None:
    assert len(redact_target(b"/" + b"a" * 1_000_000)) == MAX_LOGGED_PATH


def test_json_line_holds_every_decision() -> None:
    outcome = Outcome(
        attempts=2, retries=1, cache="hit", breaker=None, rate_limit="queued", rate_limit_wait_s=0.25
    )
    entry = json.loads(to_json(_record(outcome=outcome, route="r", upstream="u", reason=None)))
    assert entry["time"] == "1970-01-01T00:00:00.500Z"
    assert (entry["attempts"], entry["retries"], entry["cache"], entry["rate_limit"]) == (
        2,
        1,
        "hit",
        "queued",
    )
    assert entry["rate_limit_wait_ms"] == 250.0
    assert entry["duration_ms"] == 12.3


def test_text_line_starts_like_nginx_combined() -> None:
    line = to_text(_record(b"/x?a=1", outcome=Outcome(attempts=1), route="r", upstream="u"))
    assert line.startswith(
        '10.0.0.1 - - [1970-01-01T00:00:00.500Z] "GET /x?a=1" 200 3 12.300ms route=r upstream=u'
    )


@given(st.binary())
def test_text_lines_never_split_or_break_quoting(target: bytes) -> None:
    line = to_text(_record(target))
    assert "\n" not in line
    assert "\r" not in line
    quoted = line.split('"')
    assert len(quoted) == 3  # exactly the one quoted request field


def test_scrub_replaces_known_secret_values() -> None:
    assert scrub("a s3cr3t b s3cr3t", {"s3cr3t", ""}) == "a REDACTED b REDACTED"


@given(
    st.binary(max_size=MAX_LOGGED_PATH).filter(lambda t: b"?" not in t),
    st.one_of(st.none(), st.text()),
    st.floats(min_value=0, max_value=1e6),
)
def test_json_lines_always_parse_back(target: bytes, route: str | None, duration_s: float) -> None:
    entry = json.loads(to_json(_record(target, route=route, duration_s=duration_s)))
    assert (entry["path"], entry["route"]) == (target.decode("latin-1"), route)
    assert entry["duration_ms"] == round(duration_s * 1000, 3)
