"""The cache sections of the config: per route and the top-level store, with file:line errors."""

from __future__ import annotations

import textwrap

import pytest

from resilient_ambassador.config_loader import ConfigError, load_config_text
from resilient_ambassador.core.config import CacheStoreConfig, Config, MiB, RouteCacheConfig
from resilient_ambassador.secrets import SecretResolver


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), "ambassador.yaml", SecretResolver(environ={}))


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value)


def test_route_and_store_blocks_map_to_the_model() -> None:
    config = load(
        """\
        redis: {url: "redis://127.0.0.1:6379/0"}
        cache: {backend: redis, max_size: 8MiB, near_cache_size: 2MiB, near_cache_ttl: 500ms}
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                cache:
                  default_ttl: 30s
                  max_ttl: 1h
                  key_headers: [Accept-Language, X-Tenant]
                  partition_by_credential: false
                  stale_while_revalidate: 10s
                  stale_if_error: 1h
                  heuristic: true
                  store_set_cookie: true
                  respect_client_no_cache: true
                  max_object_size: 256KiB
                  coalesce_wait: 2s
              - upstream: api
                match: {prefix: /off}
                cache: {enabled: false}
              - upstream: api
                match: {prefix: /plain}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """
    )
    assert config.cache == CacheStoreConfig("redis", 8 * MiB, 2 * MiB, 0.5)
    routes = config.listeners[0].routes
    assert routes[0].cache == RouteCacheConfig(
        enabled=True,
        default_ttl_s=30.0,
        max_ttl_s=3600.0,
        key_headers=("accept-language", "x-tenant"),
        partition_by_credential=False,
        stale_while_revalidate_s=10.0,
        stale_if_error_s=3600.0,
        heuristic=True,
        store_set_cookie=True,
        respect_client_no_cache=True,
        max_object_bytes=256 * 1024,
        coalesce_wait_s=2.0,
    )
    assert routes[1].cache == RouteCacheConfig(enabled=False)
    assert routes[2].cache == RouteCacheConfig()  # no block: off


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            """\
            cache: {backend: redis}
            listeners: [{listen: "127.0.0.1:8000", routes: [{upstream: api}]}]
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            """,
            "ambassador.yaml:1: cache.backend: the cache backend is redis but the config has no redis.url",
        ),
        (
            """\
            cache: {backend: disk}
            listeners: [{listen: "127.0.0.1:8000", routes: [{upstream: api}]}]
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            """,
            "ambassador.yaml:1: cache.backend: expected one of: memory, redis",
        ),
        (
            """\
            listeners:
              - listen: 127.0.0.1:8000
                routes:
                  - upstream: api
                    cache:
                      key_headers: [X-A, x-a]
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            """,
            "ambassador.yaml:6: listeners[0].routes[0].cache.key_headers[1]: x-a is listed twice",
        ),
        (
            """\
            listeners:
              - listen: 127.0.0.1:8000
                routes:
                  - upstream: api
                    cache:
                      stale_if_error: soon
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            """,
            "ambassador.yaml:6: listeners[0].routes[0].cache.stale_if_error: "
            "expected a duration like 250ms, 2s, 5m",
        ),
        (
            """\
            listeners:
              - listen: 127.0.0.1:8000
                routes:
                  - upstream: api
                    cache: {max_object_size: 0}
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            """,
            "ambassador.yaml:5: listeners[0].routes[0].cache.max_object_size: must be greater than 0",
        ),
    ],
)
def test_errors_name_the_key_and_line(text: str, expected: str) -> None:
    assert error(text) == expected
