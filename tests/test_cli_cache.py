"""The cache's quick-start flags: --cache, --cache-ttl, --stale-if-error, and --redis."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel

from resilient_ambassador.cli import build_parser, config_for_run
from resilient_ambassador.config_loader import ConfigError
from resilient_ambassador.core.config import RouteCacheConfig
from resilient_ambassador.secrets import SecretResolver
from tests.stores.redis_server import redis_server
from tests.support.client import http_request
from tests.support.process import CLI, free_port, wait_listening
from tests.support.upstream import Reply, start_fake_upstream

UPSTREAM = ["run", "--upstream", "http://127.0.0.1:9"]


def route_cache(*flags: str) -> RouteCacheConfig:
    config = config_for_run(build_parser().parse_args([*UPSTREAM, *flags]), SecretResolver())
    return config.listeners[0].routes[0].cache


def test_cache_is_off_unless_asked_for() -> None:
    assert not route_cache().enabled


def test_cache_flag_honours_upstream_headers_only() -> None:
    assert route_cache("--cache") == RouteCacheConfig(enabled=True)


def test_ttl_and_stale_if_error_imply_cache() -> None:
    cache = route_cache("--cache-ttl", "30s", "--stale-if-error", "1h")
    assert (cache.enabled, cache.default_ttl_s, cache.stale_if_error_s) == (True, 30.0, 3600.0)


def test_redis_flag_moves_the_store_to_redis() -> None:
    args = build_parser().parse_args([*UPSTREAM, "--cache", "--redis", "redis://127.0.0.1:6379/0"])
    config = config_for_run(args, SecretResolver())
    assert config.cache.backend == "redis"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cache-ttl", "soon"], "--cache-ttl: expected a duration"),
        (["--stale-if-error", "0s"], "greater than 0"),
    ],
)
def test_bad_durations_are_usage_errors(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        route_cache(*flags)


async def test_two_daemon_processes_share_entries_through_redis(nursery: trio.Nursery) -> None:
    """The quick-start flags, as two real processes: the second serves the first's entry."""
    upstream = await start_fake_upstream(nursery, default=Reply(body=b"from-upstream"))
    with redis_server() as redis:
        ports = [free_port() for _ in range(2)]
        processes = [
            await trio.lowlevel.open_process(
                [
                    *CLI,
                    "run",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--admin",
                    f"127.0.0.1:{free_port()}",
                    "--upstream",
                    upstream.url(),
                    "--cache-ttl",
                    "60s",
                    "--redis",
                    redis.url,
                    "--log-level",
                    "warning",
                ]
            )
            for port in ports
        ]
        try:
            for port, process in zip(ports, processes, strict=True):
                await wait_listening(port, process)
            host = [("host", "localhost:8000")]  # both pods' apps call their sidecar alike
            first = await http_request(ports[0], "GET", "/v1/a", host)
            for _ in range(250):  # the first pod writes to Redis in the background
                if _has_entry(redis.command("KEYS", "ra:c:*")):
                    break
                await trio.sleep(0.02)
            second = await http_request(ports[1], "GET", "/v1/a", host)
        finally:
            for process in processes:
                process.kill()
                await process.wait()
    assert first.header("cache-status") == "resilient-ambassador; fwd=uri-miss; stored"
    assert second.body == b"from-upstream"
    assert (second.header("cache-status") or "").startswith("resilient-ambassador; hit")
    assert len(upstream.received) == 1


def _has_entry(keys_reply: bytes) -> bool:
    """Whether a raw KEYS reply lists an entry (`ra:c:` + 32 hex digits)."""
    return any(
        len(line) == len("ra:c:") + 32 for line in keys_reply.split(b"\r\n") if line.startswith(b"ra:c:")
    )
