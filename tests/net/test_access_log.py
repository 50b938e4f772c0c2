"""The access log end to end: one line per request, with each policy's decision, and never a
secret, whichever way the request went."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import trio

from resilient_ambassador.core.config import AccessLogConfig, BreakerConfig, RetryConfig
from resilient_ambassador.core.templates import parse_template
from resilient_ambassador.secrets import SecretResolver
from tests.support.client import http_request, raw_exchange
from tests.support.daemon import RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.upstream import Reply, start_fake_upstream

CANARY = "canary-7f3a9c-secret"


async def _daemon(
    nursery: trio.Nursery, path: Path, fmt: str = "json", **upstream_fields: Any
) -> tuple[RunningDaemon, Any]:
    upstream = await start_fake_upstream(nursery)
    config = simple_config(upstream_config(upstream.url(), **upstream_fields), retry=RetryConfig(retries=1))
    config = dataclasses.replace(
        config, access_log=AccessLogConfig(format="json" if fmt == "json" else "text", path=str(path))
    )
    daemon = await start_daemon(nursery, config, SecretResolver({"API_KEY": CANARY}))
    return daemon, upstream


async def _lines(daemon: RunningDaemon, path: Path) -> list[str]:
    assert daemon.app.access_log is not None
    await daemon.app.access_log.flush()
    return (await trio.Path(path).read_text()).splitlines()


async def test_one_json_line_per_request_with_the_decisions(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    daemon, upstream = await _daemon(nursery, path)
    upstream.script(Reply(status=503), Reply(body=b"hello"))

    await http_request(daemon.port, "GET", "/movies?page=2")
    await http_request(daemon.port, "POST", "/movies", body=b"x")
    entries = [json.loads(line) for line in await _lines(daemon, path)]

    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("GET", "/movies?page=2", 200),
        ("POST", "/movies", 200),
    ]
    first = entries[0]
    assert (first["attempts"], first["retries"], first["bytes"]) == (2, 1, 5)
    assert (first["upstream"], first["listener"]) == ("up", "main")
    assert first["client"] == "127.0.0.1"
    assert first["duration_ms"] >= 0
    assert first["time"].endswith("Z")
    assert entries[1]["attempts"] == 1
    assert not first["aborted"]


async def test_breaker_refusals_and_errors_carry_their_reason(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    breaker = BreakerConfig(failure_threshold=1, min_requests=0, reset_timeout_s=30.0)
    daemon, upstream = await _daemon(nursery, path, breaker=breaker)
    upstream.default = Reply(status=503)

    await http_request(daemon.port, "POST", "/")  # 503: opens the breaker
    await http_request(daemon.port, "GET", "/")  # refused by the open breaker
    entries = [json.loads(line) for line in await _lines(daemon, path)]

    assert [(e["status"], e["breaker"], e["reason"]) for e in entries] == [
        (503, None, None),
        (503, "open", "circuit_open"),
    ]
    assert entries[1]["attempts"] == 0


async def test_requests_rejected_before_routing_are_logged(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    daemon, _ = await _daemon(nursery, path)

    await raw_exchange(
        daemon.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    )
    entries = [json.loads(line) for line in await _lines(daemon, path)]

    assert [(e["method"], e["status"], e["reason"]) for e in entries] == [("-", 431, "headers_too_large")]


async def test_secrets_never_reach_the_log(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    daemon, upstream = await _daemon(nursery, path, headers=(("X-Api-Key", parse_template("${API_KEY}")),))

    await http_request(daemon.port, "GET", f"/v3/movie?api_key={CANARY}&page=1")
    await http_request(daemon.port, "GET", f"/echo/{CANARY}")
    text = "\n".join(await _lines(daemon, path))

    assert upstream.received[0].header("x-api-key") == CANARY  # it was injected ...
    assert CANARY not in text  # ... and never logged, from the query string or the path
    assert "api_key=REDACTED&page=1" in text


async def test_text_format_escapes_what_a_client_controls(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    daemon, _ = await _daemon(nursery, path, fmt="text")

    await raw_exchange(daemon.port, b'GET /a"b\\c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    (line,) = await _lines(daemon, path)

    assert '"GET /a\\x22b\\x5cc"' in line
    assert " 200 " in line
