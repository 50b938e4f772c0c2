"""Access log lines: one per request, JSON (default) or text, with secrets kept out.

The daemon sits on the path of every outbound call, so its access log is what operators grep
first; it must never become the place a credential leaks. The injected credential is added by
the upstream client after the request is logged here, so it cannot appear in the path we log;
what can is a secret the *client* put in the query string (`?api_key=...`). Query values whose
names look like credentials (OpenTelemetry's URL redaction list plus common names) are
replaced by `REDACTED`, and any known secret value found anywhere in the line is too.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import final

from resilient_ambassador.core.messages import Outcome

REDACTED = "REDACTED"  # OpenTelemetry's placeholder for redacted URL parts
# OpenTelemetry semantic conventions (url.query): these names' values are always redacted.
_OTEL_SENSITIVE = frozenset({"awsaccesskeyid", "signature", "sig", "x-goog-signature"})
# Substrings that mark a query parameter as a credential in the APIs people put behind us.
_SENSITIVE_PARTS = ("key", "token", "secret", "password", "passwd", "auth", "credential", "session")
MAX_LOGGED_PATH = 2048  # a 1 MiB query string must not become a 1 MiB log line
_NO_OUTCOME = Outcome()  # read only: for requests refused before any stage ran


def is_sensitive_query_name(name: str, extra: Collection[str] = ()) -> bool:
    lowered = name.lower()
    return lowered in _OTEL_SENSITIVE or lowered in extra or any(part in lowered for part in _SENSITIVE_PARTS)


def redact_target(target: bytes, extra_names: Collection[str] = ()) -> str:
    """The request target for a log line: credential-like query values replaced, cut to
    `MAX_LOGGED_PATH`. Decoded as latin-1 so any byte sequence logs without an error."""
    text = target[:MAX_LOGGED_PATH].decode("latin-1")
    path, sep, query = text.partition("?")
    if not sep:
        return text
    pairs = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        if eq and value and is_sensitive_query_name(name, extra_names):
            pairs.append(f"{name}={REDACTED}")
        else:
            pairs.append(pair)
    return f"{path}?{'&'.join(pairs)}"


@final
@dataclass(slots=True)
class AccessRecord:
    """One request as it went: who asked, what happened, and what each policy decided."""

    time: float  # wall clock (epoch seconds) when the request head was read
    listener: str
    client_ip: bytes
    method: bytes  # b"-" for a request refused before its head was parsed
    target: bytes  # as the client sent it: redacted when the line is formatted, off the request path
    status: int
    bytes_sent: int  # response body bytes written to the client
    duration_s: float
    route: str | None = None
    upstream: str | None = None
    outcome: Outcome | None = None
    reason: str | None = None  # our error reason when we generated the response
    aborted: bool = False  # the response was cut short (client gone or upstream failed mid-body)
    trace_id: str | None = None


_millisecond_cache: tuple[int, str] = (-1, "")


def _timestamp(epoch: float) -> str:
    """ISO 8601 UTC with milliseconds; a busy daemon logs many lines per millisecond, so the
    last millisecond's text is reused."""
    global _millisecond_cache
    millis = int(epoch * 1000)
    cached_millis, text = _millisecond_cache
    if cached_millis != millis:
        seconds, fraction = divmod(millis, 1000)
        text = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{fraction:03d}Z"
        _millisecond_cache = (millis, text)
    return text


_json_string = encode_basestring_ascii  # json's own C escaper


def _s(value: str | None) -> str:
    return "null" if value is None else _json_string(value)


def to_json(record: AccessRecord) -> str:
    """One JSON object, built by hand: a dict plus an encoder cost three times as much."""
    o = record.outcome or _NO_OUTCOME
    return (
        f'{{"time":"{_timestamp(record.time)}","listener":{_json_string(record.listener)},'
        f'"client":{_json_string(record.client_ip.decode("latin-1"))},'
        f'"method":{_json_string(record.method.decode("latin-1"))},'
        f'"path":{_json_string(redact_target(record.target))},'
        f'"status":{record.status},"bytes":{record.bytes_sent},'
        f'"duration_ms":{round(record.duration_s * 1000, 3)!r},'
        f'"route":{_s(record.route)},"upstream":{_s(record.upstream)},'
        f'"attempts":{o.attempts},"retries":{o.retries},"cache":{_s(o.cache)},'
        f'"breaker":{_s(o.breaker)},"rate_limit":{_s(o.rate_limit)},'
        f'"rate_limit_wait_ms":{round(o.rate_limit_wait_s * 1000, 3)!r},"reason":{_s(record.reason)},'
        f'"aborted":{"true" if record.aborted else "false"},"trace_id":{_s(record.trace_id)}}}'
    )


def _escape(text: str) -> str:
    """Text-format safety: a client-chosen target must not forge a second log line, close the
    quoted field, or send terminal escapes (nginx escapes the same way, as \\xNN)."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c not in '"\\' else f"\\x{ord(c):02x}" for c in text)


def to_text(record: AccessRecord) -> str:
    """nginx's combined-log order first (so the usual tools read it), then our fields."""
    outcome = record.outcome or _NO_OUTCOME
    fields = [
        f"{record.client_ip.decode('latin-1')} - - [{_timestamp(record.time)}]",
        f'"{record.method.decode("latin-1")} {_escape(redact_target(record.target))}"',
        str(record.status),
        str(record.bytes_sent),
        f"{record.duration_s * 1000:.3f}ms",
        f"route={record.route or '-'}",
        f"upstream={record.upstream or '-'}",
        f"attempts={outcome.attempts}",
    ]
    for name, value in (
        ("retries", outcome.retries or None),
        ("cache", outcome.cache),
        ("breaker", outcome.breaker),
        ("rate_limit", outcome.rate_limit),
        ("reason", record.reason),
        ("trace_id", record.trace_id),
    ):
        if value is not None:
            fields.append(f"{name}={value}")
    if record.aborted:
        fields.append("aborted")
    return " ".join(fields)


def scrub(line: str, secret_values: Collection[str]) -> str:
    """The last line of defence: any known secret value left in a line is replaced."""
    for secret in secret_values:
        if secret and secret in line:
            line = line.replace(secret, REDACTED)
    return line
