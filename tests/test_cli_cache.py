"""The cache's quick-start flags: --cache, --cache-ttl, --stale-if-error, and --redis."""

from __future__ import annotations

import pytest

from resilient_ambassador.cli import build_parser, config_for_run
from resilient_ambassador.config_loader import ConfigError
from resilient_ambassador.core.config import RouteCacheConfig
from resilient_ambassador.secrets import SecretResolver

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
