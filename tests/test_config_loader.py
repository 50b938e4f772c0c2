"""YAML and one-liner flags -> Config: every error names the file, line and key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from resilient_ambassador.config_loader import (
    ConfigError,
    config_from_flags,
    load_config,
    load_config_text,
    parse_listen_address,
    parse_upstream_url,
)
from resilient_ambassador.core.config import (
    AdminConfig,
    BreakerConfig,
    ClientLimits,
    Config,
    DNSConfig,
    DrainConfig,
    ListenerConfig,
    MiB,
    PoolConfig,
    QuotaConfig,
    RateLimitConfig,
    RedisConfig,
    RetryConfig,
    RouteConfig,
    TLSConfig,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamURL,
)
from resilient_ambassador.core.templates import parse_template
from resilient_ambassador.secrets import SecretResolver
from tests.support.tls import make_tls_material

EXAMPLES = Path(__file__).parent.parent / "examples"
SECRET = "s3cr3t-canary-7f1d"


def load(text: str, environ: dict[str, str] | None = None) -> Config:
    resolver = SecretResolver(environ={} if environ is None else environ)
    return load_config_text(textwrap.dedent(text), "ambassador.yaml", resolver)


def error(text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(text, environ)
    return str(info.value)


def test_full_schema_maps_to_the_model(tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    ca, cert, key = tls.ca_file, tls.client_cert_file, tls.client_key_file
    token = tmp_path / "token"
    token.write_text("tok\n")
    config = load(
        f"""\
        listeners:
          - name: main
            listen: 127.0.0.1:8000
            protocol: http
            limits:
              max_request_line: 4KiB
              max_header_size: 16KiB
              max_header_count: 50
              header_read_timeout: 5s
              body_read_timeout: 30s
              send_timeout: 20s
              keepalive_timeout: 75s
              max_requests_per_connection: 500
              max_connections: 2000
            routes:
              - name: api
                match: {{prefix: /api, host: API.Example.com}}
                rewrite_prefix: /
                upstream: tmdb
                max_request_body: 2MiB
          - listen: "[::1]:0"
            routes:
              - upstream: tmdb
        upstreams:
          tmdb:
            url: https://api.themoviedb.org/3/
            host_header: api.themoviedb.org
            tls:
              verify: false
              ca_file: {ca}
              cert_file: {cert}
              key_file: {key}
              server_name: tmdb
              min_version: 1.3  # unquoted: read as written, not as the float YAML sees
            timeouts: {{connect: 250ms, response: 2s, read_idle: 1m}}
            pool: {{max_connections: 10, idle_timeout: 30s, acquire_timeout: 1s}}
            headers: {{Authorization: "Bearer ${{file:{token}}}"}}
            query: {{api_key: "${{TMDB_API_KEY}}", lang: en}}
        drain: {{grace_period: 10s}}
        """,
        {"TMDB_API_KEY": "k"},
    )
    assert config == Config(
        listeners=(
            ListenerConfig(
                name="main",
                host="127.0.0.1",
                port=8000,
                protocol="http",
                routes=(
                    RouteConfig(
                        upstream="tmdb",
                        name="api",
                        prefix="/api",
                        host="api.example.com",
                        rewrite_prefix="/",
                        max_request_body_bytes=2 * MiB,
                    ),
                ),
                limits=ClientLimits(
                    max_request_line_bytes=4096,
                    max_header_bytes=16384,
                    max_header_count=50,
                    header_read_timeout_s=5.0,
                    body_read_timeout_s=30.0,
                    send_timeout_s=20.0,
                    keepalive_timeout_s=75.0,
                    max_requests_per_connection=500,
                    max_connections=2000,
                ),
            ),
            ListenerConfig(
                name="listener-1",
                host="::1",
                port=0,
                routes=(RouteConfig(upstream="tmdb", name="listener-1-route-0"),),
            ),
        ),
        upstreams={
            "tmdb": UpstreamConfig(
                name="tmdb",
                url=UpstreamURL("https", "api.themoviedb.org", 443, "/3"),
                tls=TLSConfig(
                    verify=False,
                    ca_file=str(ca),
                    cert_file=str(cert),
                    key_file=str(key),
                    server_name="tmdb",
                    min_version="1.3",
                ),
                timeouts=UpstreamTimeouts(connect_s=0.25, response_s=2.0, read_idle_s=60.0),
                pool=PoolConfig(max_connections=10, idle_timeout_s=30.0, acquire_timeout_s=1.0),
                headers=(("Authorization", parse_template(f"Bearer ${{file:{token}}}")),),
                query=(("api_key", parse_template("${TMDB_API_KEY}")), ("lang", parse_template("en"))),
                host_header="api.themoviedb.org",
            )
        },
        drain=DrainConfig(grace_period_s=10.0),
        source="ambassador.yaml",
    )


def test_minimal_config_gets_defaults() -> None:
    config = load(
        """\
        listeners: [{listen: "localhost:8000", routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://10.0.0.1:8080"}}
        """
    )
    (listener,) = config.listeners
    assert listener == ListenerConfig(
        "listener-0", "localhost", 8000, routes=(RouteConfig("api", "listener-0-route-0"),)
    )
    assert config.upstreams["api"] == UpstreamConfig("api", UpstreamURL("http", "10.0.0.1", 8080))
    assert config.drain == DrainConfig()


def test_dns_section() -> None:
    text = """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://api.default.svc:8080"}}
        """
    assert load(text).dns == DNSConfig()
    config = load(text + "dns: {max_ttl: 10s, negative_ttl: 500ms, max_stale: 0s, timeout: 1s}\n")
    assert config.dns == DNSConfig(max_ttl_s=10.0, negative_ttl_s=0.5, max_stale_s=0.0, timeout_s=1.0)


def test_route_order_is_kept() -> None:
    config = load(
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - {match: {prefix: /}, upstream: api}
              - {match: {prefix: /api/v1}, upstream: api}
              - {match: {prefix: /api}, upstream: api}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """
    )
    assert [r.prefix for r in config.listeners[0].routes] == ["/", "/api/v1", "/api"]


def test_two_listeners_on_port_zero_are_fine() -> None:
    config = load(
        """\
        listeners:
          - {listen: 127.0.0.1:0, routes: [{upstream: api}]}
          - {listen: 127.0.0.1:0, routes: [{upstream: api}]}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """
    )
    assert [listener.port for listener in config.listeners] == [0, 0]


# Each case: the YAML, and the exact message. Lines are counted from 1.
ERRORS = {
    "unknown key": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: tmdb
        upstreams:
          tmdb:
            url: https://api.themoviedb.org/3
            timeouts:
              conect: 3s
        """,
        "ambassador.yaml:9: upstreams.tmdb.timeouts.conect: unknown key "
        "(expected one of: connect, response, read_idle)",
    ),
    "bad size": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                match: {prefix: /a}
              - upstream: api
                max_request_body: 1 megabyte
        upstreams:
          api: {url: "http://127.0.0.1:9000"}
        """,
        "ambassador.yaml:7: listeners[0].routes[1].max_request_body: expected a size like 64KiB, 1MiB",
    ),
    "bad duration": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: "http://127.0.0.1:9000"
            pool: {idle_timeout: 1 minute}
        """,
        "ambassador.yaml:5: upstreams.api.pool.idle_timeout: expected a duration like 250ms, 2s, 5m",
    ),
    "unknown top-level key": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        stats: {listen: 127.0.0.1:9902}
        """,
        "ambassador.yaml:3: stats: unknown key "
        "(expected one of: listeners, upstreams, drain, redis, admin, access_log, workers, telemetry, "
        "cache, dns)",
    ),
    "dns unknown key": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://api.default.svc:8080"}}
        dns:
          ttl: 30s
        """,
        "ambassador.yaml:4: dns.ttl: "
        "unknown key (expected one of: max_ttl, negative_ttl, max_stale, timeout)",
    ),
    "dns zero negative ttl": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://api.default.svc:8080"}}
        dns: {negative_ttl: 0s}
        """,
        "ambassador.yaml:3: dns.negative_ttl: must be greater than 0",
    ),
    "bad access log format": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        access_log: {format: yaml}
        """,
        "ambassador.yaml:3: access_log.format: expected one of: json, text",
    ),
    "listeners not a list": (
        """\
        listeners:
          listen: 127.0.0.1:8000
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:1: listeners: expected a list, got a mapping",
    ),
    "empty listeners": (
        """\
        listeners: []
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:1: listeners: expected a non-empty list",
    ),
    "empty routes": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes: []
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:3: listeners[0].routes: expected a non-empty list",
    ),
    "limits not a mapping": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            limits: 5
            routes: [{upstream: api}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:3: listeners[0].limits: expected a mapping, got a single value",
    ),
    "count not a number": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            limits:
              max_header_count: ten
            routes: [{upstream: api}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:4: listeners[0].limits.max_header_count: expected a whole number",
    ),
    "null value": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream:
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:4: listeners[0].routes[0].upstream: expected a string, got nothing (null)",
    ),
    "name not a string": (
        """\
        listeners:
          - name: [a, b]
            listen: 127.0.0.1:8000
            routes: [{upstream: api}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:2: listeners[0].name: expected a string, got a list",
    ),
    "YAML 1.1 boolean words are not booleans": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            tls:
              verify: no
        """,
        "ambassador.yaml:6: upstreams.api.tls.verify: expected one of: true, false",
    ),
    "missing listen": (
        """\
        listeners:
          - name: main
            routes: [{upstream: api}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:2: listeners[0].listen: missing required key",
    ),
    "missing url": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            host_header: example.com
        """,
        "ambassador.yaml:3: upstreams.api.url: missing required key",
    ),
    "missing upstreams": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        """,
        "ambassador.yaml:1: upstreams: missing required key",
    ),
    "duplicate key": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://127.0.0.1:9000
            url: http://127.0.0.1:9001
        """,
        "ambassador.yaml:5: upstreams.api.url: duplicate key (first at line 4)",
    ),
    "duplicate upstream": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api: {url: "http://127.0.0.1:9000"}
          api: {url: "http://127.0.0.1:9001"}
        """,
        "ambassador.yaml:4: upstreams.api: duplicate key (first at line 3)",
    ),
    "unknown upstream": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: tmbd
        upstreams: {tmdb: {url: "https://api.themoviedb.org"}}
        """,
        "ambassador.yaml:4: listeners[0].routes[0].upstream: unknown upstream 'tmbd' (defined: tmdb)",
    ),
    "same host:port": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes: [{upstream: api}]
          - listen: 127.0.0.1:8000
            routes: [{upstream: api}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:4: listeners[1].listen: address already used by listeners[0].listen (line 2)",
    ),
    "duplicate listener name": (
        """\
        listeners:
          - {name: main, listen: 127.0.0.1:8000, routes: [{upstream: api}]}
          - {name: main, listen: 127.0.0.1:8001, routes: [{upstream: api}]}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:3: listeners[1].name: name 'main' is already used by listeners[0].name (line 2)",
    ),
    "bad listen": (
        """\
        listeners: [{listen: "8000", routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:1: listeners[0].listen: expected HOST:PORT like 127.0.0.1:8000 or [::1]:8000",
    ),
    "listen port out of range": (
        """\
        listeners: [{listen: "127.0.0.1:65536", routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:1: listeners[0].listen: port must be at most 65535",
    ),
    "tcp listener with routes": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            routes: [{upstream: api}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:4: listeners[0].routes: not for a tcp listener (it has a relay section)",
    ),
    "unknown protocol": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: udp
            routes: [{upstream: api}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:3: listeners[0].protocol: expected one of: http, tcp",
    ),
    "unknown cache key on a route": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                cache: {ttl: 3s}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:5: listeners[0].routes[0].cache.ttl: unknown key (expected one of: enabled, "
        "default_ttl, max_ttl, key_headers, partition_by_credential, stale_while_revalidate, "
        "stale_if_error, heuristic, store_set_cookie, respect_client_no_cache, max_object_size, "
        "coalesce_wait)",
    ),
    "unknown retry key": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                retry: {attempts: 3}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:5: listeners[0].routes[0].retry.attempts: unknown key (expected one of: "
        "retries, methods, on_statuses, backoff_base, backoff_max, per_try_timeout, buffer_body, "
        "respect_retry_after, budget)",
    ),
    "unknown budget key": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                retry:
                  budget: {percent: 20}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:6: listeners[0].routes[0].retry.budget.percent: unknown key "
        "(expected one of: ratio, min_per_second, window)",
    ),
    "bad status code": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                retry:
                  on_statuses: [503, 700]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:6: listeners[0].routes[0].retry.on_statuses[1]: "
        "expected a status code between 100 and 599",
    ),
    "lower-case method": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                retry:
                  methods: [GET, post]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:6: listeners[0].routes[0].retry.methods[1]: "
        "expected an upper-case method such as GET",
    ),
    "backoff cap below base": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                retry: {backoff_base: 1s, backoff_max: 100ms}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:5: listeners[0].routes[0].retry: backoff_max must not be below backoff_base",
    ),
    "breaker threshold zero": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://127.0.0.1:9000
            breaker: {failure_threshold: 0}
        """,
        "ambassador.yaml:5: upstreams.api.breaker.failure_threshold: must be greater than 0",
    ),
    "reserved key on an upstream": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://127.0.0.1:9000
            cache: {}
        """,
        "ambassador.yaml:5: upstreams.api.cache: cache is not implemented in this version yet",
    ),
    "reserved key elsewhere is just unknown": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            cache: {}
            routes: [{upstream: api}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:3: listeners[0].cache: unknown key "
        "(expected one of: name, listen, protocol, limits, routes, relay, tls)",
    ),
    "prefix without slash": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                match: {prefix: api}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:5: listeners[0].routes[0].match.prefix: expected a path starting with /",
    ),
    "route host with port": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                match: {host: "api.example.com:8000"}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:5: listeners[0].routes[0].match.host: expected a host name without a port",
    ),
    "zero duration": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://127.0.0.1:9000
            timeouts: {connect: 0s}
        """,
        "ambassador.yaml:5: upstreams.api.timeouts.connect: must be greater than 0",
    ),
    "zero size": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            limits: {max_header_size: 0KiB}
            routes: [{upstream: api}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """,
        "ambassador.yaml:3: listeners[0].limits.max_header_size: must be greater than 0",
    ),
    "zero count": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://127.0.0.1:9000
            pool:
              max_connections: 0
        """,
        "ambassador.yaml:6: upstreams.api.pool.max_connections: must be greater than 0",
    ),
    "unsupported scheme": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api: {url: "ftp://files.example.com"}
        """,
        "ambassador.yaml:3: upstreams.api.url: unsupported scheme ftp:// (expected http:// or https://)",
    ),
    "not a URL": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api: {url: "api.example.com"}
        """,
        "ambassador.yaml:3: upstreams.api.url: expected a URL like https://api.example.com/v1",
    ),
    "userinfo": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api: {url: "https://user:s3cr3t-canary-7f1d@api.example.com"}
        """,
        "ambassador.yaml:3: upstreams.api.url: credentials in the URL (user:password@) are not supported;"
        " use headers",
    ),
    "query": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api: {url: "https://api.example.com/v1?key=1"}
        """,
        "ambassador.yaml:3: upstreams.api.url: a query string in the URL is not supported;"
        " use the query mapping",
    ),
    "fragment": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api: {url: "https://api.example.com/v1#top"}
        """,
        "ambassador.yaml:3: upstreams.api.url: a fragment (#...) in the URL is not supported",
    ),
    "upstream port 0": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api: {url: "http://127.0.0.1:0"}
        """,
        "ambassador.yaml:3: upstreams.api.url: port must be 1..65535",
    ),
    "tls on http": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://api.example.com
            tls: {verify: true}
        """,
        "ambassador.yaml:5: upstreams.api.tls: tls is set but the URL is http:// (use https://)",
    ),
    "cert without key": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            tls:
              cert_file: /etc/client.pem
        """,
        "ambassador.yaml:5: upstreams.api.tls: cert_file and key_file must be set together",
    ),
    "key without cert": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            tls: {key_file: /etc/client.key}
        """,
        "ambassador.yaml:5: upstreams.api.tls: cert_file and key_file must be set together",
    ),
    "bad min_version": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            tls: {min_version: 1.1}
        """,
        "ambassador.yaml:5: upstreams.api.tls.min_version: expected one of: 1.2, 1.3",
    ),
    "header name not a token": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            headers:
              "X Api Key": abc
        """,
        "ambassador.yaml:6: upstreams.api.headers.X Api Key: 'X Api Key' is not a valid header name",
    ),
    "hop-by-hop header": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            headers: {Connection: close}
        """,
        "ambassador.yaml:5: upstreams.api.headers.Connection: Connection is a hop-by-hop or framing header;"
        " the proxy manages it",
    ),
    "framing header": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            headers: {transfer-encoding: chunked}
        """,
        "ambassador.yaml:5: upstreams.api.headers.transfer-encoding: transfer-encoding is a hop-by-hop"
        " or framing header; the proxy manages it",
    ),
    "content-length header": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            headers: {Content-Length: "0"}
        """,
        "ambassador.yaml:5: upstreams.api.headers.Content-Length: Content-Length is a hop-by-hop or framing"
        " header; the proxy manages it",
    ),
    "host header": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            headers: {Host: other.example.com}
        """,
        "ambassador.yaml:5: upstreams.api.headers.Host: Host cannot be injected;"
        " use the upstream's host_header",
    ),
    "same header twice": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            headers:
              X-Api-Key: a
              x-api-key: b
        """,
        "ambassador.yaml:7: upstreams.api.headers.x-api-key: same header as upstreams.api.headers.X-Api-Key"
        " (line 6)",
    ),
    "bad template": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            query:
              api_key: "${API_KEY"
        """,
        "ambassador.yaml:6: upstreams.api.query.api_key: unclosed '${' at position 0",
    ),
    "missing env var": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            headers:
              X-Api-Key: "${API_KEY}"
        """,
        "ambassador.yaml:6: upstreams.api.headers.X-Api-Key: environment variable API_KEY is not set",
    ),
    "missing secret file": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: https://api.example.com
            headers:
              Authorization: "Bearer ${file:/nonexistent/token}"
        """,
        "ambassador.yaml:6: upstreams.api.headers.Authorization: cannot read secret file /nonexistent/token:"
        " No such file or directory",
    ),
    "bad upstream name": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          "my api": {url: "http://127.0.0.1:9000"}
        """,
        "ambassador.yaml:3: upstreams.my api: an upstream name is made of letters, digits, '.', '_' and '-'",
    ),
    "top level not a mapping": (
        """\
        - listen: 127.0.0.1:8000
        """,
        "ambassador.yaml:1: expected a mapping, got a list",
    ),
    "YAML syntax": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
           routes: []
        """,
        "ambassador.yaml:3: invalid YAML: expected <block end>, but found '<block mapping start>'",
    ),
    "empty": ("", "ambassador.yaml:1: the config is empty"),
}


@pytest.mark.parametrize(("text", "message"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_file_line_and_key_path(text: str, message: str) -> None:
    assert error(text) == message


def test_secret_value_never_appears_in_an_error() -> None:
    environ = {"API_KEY": SECRET, "BAD": f"{SECRET}\r\nX-Evil: 1"}
    broken = [
        # A value read from the environment that would split the header.
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "https://a.example", headers: {X-Key: "${BAD}"}}}
        """,
        # A resolved secret, then an error later in the same upstream.
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "https://a.example", headers: {X-Key: "${API_KEY}", Host: x}}}
        """,
        # Literal secrets in broken YAML, a broken URL, a broken template and a header name.
        f"""\
        upstreams: {{api: {{headers: {{X-Key: "{SECRET}
        """,
        f"""\
        listeners: [{{listen: 127.0.0.1:8000, routes: [{{upstream: api}}]}}]
        upstreams: {{api: {{url: "https://u:{SECRET}@a.example"}}}}
        """,
        f"""\
        listeners: [{{listen: 127.0.0.1:8000, routes: [{{upstream: api}}]}}]
        upstreams: {{api: {{url: "https://a.example", headers: {{X-Key: "{SECRET}$"}}}}}}
        """,
        f"""\
        listeners: [{{listen: 127.0.0.1:8000, routes: [{{upstream: api}}]}}]
        upstreams: {{api: {{url: "https://a.example", query: {{k: "{SECRET}\\n"}}}}}}
        """,
    ]
    for text in broken:
        message = error(text, environ)
        assert message.startswith("ambassador.yaml:")
        assert SECRET not in message, message


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "ambassador.yaml"
    path.write_text("listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]\nupstreams: {api: 5}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, SecretResolver(environ={}))
    assert str(info.value) == f"{path}:2: upstreams.api: expected a mapping, got a single value"


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read the config: No such file or directory"


def test_jsonplaceholder_example_loads() -> None:
    config = load_config(EXAMPLES / "jsonplaceholder.yaml", SecretResolver(environ={}))
    (listener,) = config.listeners
    assert (listener.host, listener.port) == ("127.0.0.1", 8000)
    assert config.upstreams["jsonplaceholder"].url == UpstreamURL(
        "https", "jsonplaceholder.typicode.com", 443
    )


def test_tmdb_example_loads_with_its_secret_file(tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(f"{SECRET}\n")
    text = (EXAMPLES / "tmdb.yaml").read_text()
    assert "/var/run/secrets/tmdb/api-key" in text
    example = tmp_path / "tmdb.yaml"
    example.write_text(text.replace("/var/run/secrets/tmdb/api-key", str(key_file)))
    resolver = SecretResolver(environ={})

    config = load_config(example, resolver)

    (listener,) = config.listeners
    assert (listener.host, listener.port) == ("127.0.0.1", 8080)
    movies = listener.routes[0]
    assert (movies.prefix, movies.rewrite_prefix, movies.upstream) == ("/movies", "/discover/movie", "tmdb")
    tmdb = config.upstreams["tmdb"]
    assert tmdb.url == UpstreamURL("https", "api.themoviedb.org", 443, "/3")
    ((name, template),) = tmdb.query
    assert name == "api_key"
    assert resolver.resolve(template) == SECRET
    assert resolver.secret_values() == {SECRET}


def test_tmdb_example_without_its_secret_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"tmdb\.yaml:\d+: upstreams\.tmdb\.query\.api_key: cannot read"):
        load_config(EXAMPLES / "tmdb.yaml", SecretResolver(environ={}))


def test_config_from_flags() -> None:
    resolver = SecretResolver(environ={"API_KEY": SECRET})
    config = config_from_flags(
        "127.0.0.1:8000",
        "https://api.example.com/v1/",
        ["X-Api-Key: ${API_KEY}", "Accept:application/json"],
        resolver,
    )
    assert config == Config(
        listeners=(
            ListenerConfig("main", "127.0.0.1", 8000, routes=(RouteConfig("default", "main-route-0"),)),
        ),
        upstreams={
            "default": UpstreamConfig(
                "default",
                UpstreamURL("https", "api.example.com", 443, "/v1"),
                headers=(
                    ("X-Api-Key", parse_template("${API_KEY}")),
                    ("Accept", parse_template("application/json")),
                ),
            )
        },
        source="<flags>",
    )
    assert resolver.secret_values() == {SECRET}


@pytest.mark.parametrize(
    ("listen", "upstream", "headers", "message"),
    [
        (
            "localhost",
            "http://a",
            [],
            "--listen 'localhost': expected HOST:PORT like 127.0.0.1:8000 or [::1]:8000",
        ),
        (
            "127.0.0.1:8000",
            "ftp://a:5432",
            [],
            "--upstream: unsupported scheme ftp:// (expected http://, https://, tcp:// or tls://)",
        ),
        (
            "127.0.0.1:8000",
            "tcp://a",
            [],
            "--upstream: a tcp:// address needs a port, like tcp://db.example.com:5432",
        ),
        (
            "127.0.0.1:8000",
            "tls://a:443/path",
            [],
            "--upstream: a tcp:// or tls:// address is HOST:PORT only (no path, query or fragment)",
        ),
        (
            "127.0.0.1:8000",
            "tcp://a:5432",
            ["X-Key: 1"],
            "--header: a tcp:// or tls:// upstream relays bytes; there are no headers",
        ),
        (
            "127.0.0.1:8000",
            f"https://u:{SECRET}@a",
            [],
            "--upstream: credentials in the URL (user:password@) are not supported; use headers",
        ),
        ("127.0.0.1:8000", "http://a", [SECRET], "--header: expected 'Name: value'"),
        (
            "127.0.0.1:8000",
            "http://a",
            ["X-Api-Key: ${API_KEY}"],
            "--header 'X-Api-Key: ...': environment variable API_KEY is not set",
        ),
        ("127.0.0.1:8000", "http://a", ["X-Key: ${"], "--header 'X-Key: ...': unclosed '${' at position 0"),
        (
            "127.0.0.1:8000",
            "http://a",
            ["Connection: close"],
            "--header 'Connection: ...': Connection is a hop-by-hop or framing header; the proxy manages it",
        ),
        (
            "127.0.0.1:8000",
            "http://a",
            ["X-A: 1", "x-a: 2"],
            "--header 'x-a: ...': the header is given twice",
        ),
        ("127.0.0.1:8000", "http://a", ["X A: 1"], "--header 'X A: ...': 'X A' is not a valid header name"),
    ],
)
def test_config_from_flags_errors(listen: str, upstream: str, headers: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_flags(listen, upstream, headers, SecretResolver(environ={}))
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:8000", ("::1", 8000)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen_address(text: str, address: tuple[str, int]) -> None:
    assert parse_listen_address(text) == address


@pytest.mark.parametrize(
    "text", ["8000", ":8000", "::1:8000", "[::1]", "[nope]:80", "host:port", "a b:80", "h:-1"]
)
def test_parse_listen_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_listen_address(text)


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("http://example.com", UpstreamURL("http", "example.com", 80)),
        ("https://Example.COM:8443/a/b/", UpstreamURL("https", "example.com", 8443, "/a/b")),
        ("http://[::1]:9000", UpstreamURL("http", "::1", 9000)),
        ("https://api.example.com/", UpstreamURL("https", "api.example.com", 443)),
    ],
)
def test_parse_upstream_url(text: str, url: UpstreamURL) -> None:
    assert parse_upstream_url(text) == url
    assert parse_upstream_url(str(url)) == url  # str() gives a URL that parses back


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("https://a.example/x y", "whitespace or control characters"),
        ("https://a.example/\tx", "whitespace or control characters"),
        ("https://a.example/?", "a query string"),
        ("https://a.example:99999", "port must be at most 65535"),
        ("https://a.example:x", "invalid host or port"),
        ("https:///path", "expected a URL like"),
        ("https://a.example/ü", "must be percent-encoded"),
    ],
)
def test_parse_upstream_url_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_upstream_url(text)


def test_unreadable_tls_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(ConfigError) as caught:
        load(
            f"""\
            listeners:
              - listen: 127.0.0.1:8000
                routes: [{{upstream: api}}]
            upstreams:
              api:
                url: https://api.example.com
                tls:
                  ca_file: {missing}
            """
        )
    assert str(caught.value).startswith("ambassador.yaml:7: upstreams.api.tls: cannot load the TLS files")


def test_retry_breaker_and_deadline_settings_map_to_the_model() -> None:
    config = load(
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                timeout: 5s
                deadline_header: X-Request-Timeout
                retry:
                  retries: 0
                  methods: [GET, HEAD]
                  on_statuses: [502, 503]
                  backoff_base: 10ms
                  backoff_max: 1s
                  per_try_timeout: 2s
                  budget: {ratio: 25%, min_per_second: 5, window: 30s}
                  buffer_body: 16KiB
                  respect_retry_after: false
        upstreams:
          api:
            url: http://127.0.0.1:9000
            breaker:
              enabled: false
              failure_threshold: 3
              reset_timeout: 10s
              success_threshold: 2
              half_open_max_probes: 2
              min_requests: 0
              window: 5s
              failure_statuses: [500, 503]
        """
    )
    route = config.listeners[0].routes[0]
    assert route.timeout_s == 5.0
    assert route.deadline_header == "x-request-timeout"
    assert route.retry == RetryConfig(
        retries=0,
        methods=frozenset({"GET", "HEAD"}),
        on_statuses=frozenset({502, 503}),
        backoff_base_s=0.01,
        backoff_max_s=1.0,
        per_try_timeout_s=2.0,
        budget_ratio=0.25,
        budget_min_per_s=5.0,
        budget_window_s=30.0,
        buffer_body_bytes=16 * 1024,
        respect_retry_after=False,
    )
    assert config.upstreams["api"].breaker == BreakerConfig(
        enabled=False,
        failure_threshold=3,
        reset_timeout_s=10.0,
        success_threshold=2,
        half_open_max_probes=2,
        min_requests=0,
        window_s=5.0,
        failure_statuses=frozenset({500, 503}),
    )


def test_redis_section_and_shared_breaker() -> None:
    config = load(
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://127.0.0.1:9000
            breaker: {shared: redis, sync_interval: 200ms}
        redis: {url: "redis://:pw@127.0.0.1:6379/2", timeout: 100ms, key_prefix: "pod-a:"}
        """
    )
    assert config.redis == RedisConfig(url="redis://:pw@127.0.0.1:6379/2", timeout_s=0.1, key_prefix="pod-a:")
    assert (config.upstreams["api"].breaker.shared, config.upstreams["api"].breaker.sync_interval_s) == (
        "redis",
        0.2,
    )


def test_shared_breaker_needs_a_redis_url() -> None:
    message = error(
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://127.0.0.1:9000
            breaker: {shared: redis}
        """
    )
    assert (
        message == "ambassador.yaml:3: upstreams.api: breaker.shared is redis but the config has no redis.url"
    )


def test_redis_url_is_checked_and_never_echoed() -> None:
    message = error(
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        redis: {url: "http://:hunter2@redis:6379"}
        """
    )
    assert message.startswith("ambassador.yaml:3: redis.url: expected a URL like redis://")
    assert "hunter2" not in message


def test_redis_topologies_and_tls(tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    base = (
        "listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]\n"
        'upstreams: {api: {url: "http://127.0.0.1:9000"}}\n'
    )
    for url in ("sentinel://s1:26379,s2:26379/mymaster", "redis+cluster://n1:7000,n2:7000"):
        assert load(base + f"redis: {{url: '{url}'}}\n").redis.url == url
    config = load(
        base
        + "redis:\n  url: rediss+cluster://n1:7000\n"
        + f"  tls: {{ca_file: {tls.ca_file}, cert_file: {tls.client_cert_file},\n"
        + f"        key_file: {tls.client_key_file}}}\n"
    )
    assert config.redis.tls == TLSConfig(
        ca_file=str(tls.ca_file), cert_file=str(tls.client_cert_file), key_file=str(tls.client_key_file)
    )
    assert error(base + "redis: {url: 'redis://r:6379', tls: {verify: false}}\n") == (
        "ambassador.yaml:3: redis.tls: tls is set but redis.url is not rediss:// or rediss+cluster://"
    )
    assert error(base + f"redis: {{url: 'rediss://r', tls: {{cert_file: {tls.client_cert_file}}}}}\n") == (
        "ambassador.yaml:3: redis.tls: cert_file and key_file must be set together"
    )
    missing = error(base + f"redis: {{url: 'rediss://r', tls: {{ca_file: {tmp_path / 'nope.pem'}}}}}\n")
    assert missing.startswith("ambassador.yaml:3: redis.tls: cannot load the TLS files")
    assert "server_name" in error(base + "redis: {url: 'rediss://r', tls: {server_name: r}}\n")
    assert error(base + "redis: {url: 'redis://r', key_prefix: '{ra}:'}\n") == (
        "ambassador.yaml:3: redis.key_prefix: a key prefix has no braces, spaces or control characters"
    )
    message = error(base + "redis: {url: 'redis+cluster://:hunter2@n1:7000/3'}\n")
    assert "database 0 only" in message
    assert "hunter2" not in message


def test_route_breaker_and_failure_errors() -> None:
    config = load(
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                breaker: {failure_threshold: 2, failure_errors: [connect, timeout]}
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """
    )
    breaker = config.listeners[0].routes[0].breaker
    assert breaker is not None
    assert breaker.failure_threshold == 2
    assert breaker.failure_errors == frozenset({"connect", "timeout"})
    assert error(
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://127.0.0.1:9000
            breaker: {failure_errors: [connect, boom]}
        """
    ).startswith("ambassador.yaml:5: upstreams.api.breaker.failure_errors[1]: expected one of: ")


def test_admin_section() -> None:
    default = load(
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        """
    )
    assert default.admin == AdminConfig(enabled=True, host="127.0.0.1", port=9901)
    moved = load(
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        admin: {listen: "[::1]:9000"}
        """
    )
    assert moved.admin == AdminConfig(enabled=True, host="::1", port=9000)
    off = load(
        """\
        listeners: [{listen: 127.0.0.1:9901, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        admin: {enabled: false}
        """
    )
    assert off.admin.enabled is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            """\
            listeners:
              - listen: 127.0.0.1:8000
                routes: [{upstream: api}]
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            admin:
              listen: 127.0.0.1:8000
            """,
            "ambassador.yaml:6: admin.listen: same address as listeners[0].listen (line 2); "
            "the admin listener never shares a data port",
        ),
        (
            """\
            listeners: [{listen: 0.0.0.0:8000, routes: [{upstream: api}]}]
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            admin: {listen: 127.0.0.1:8000}
            """,
            "ambassador.yaml:3: admin.listen: same address as listeners[0].listen (line 1); "
            "the admin listener never shares a data port",
        ),
        (
            """\
            listeners: [{listen: 127.0.0.1:9901, routes: [{upstream: api}]}]
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            """,
            "ambassador.yaml:1: listeners[0].listen: the admin listener uses 127.0.0.1:9901 by default; "
            "set admin.listen to another address",
        ),
        (
            """\
            listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            admin: {listen: off}
            """,
            "ambassador.yaml:3: admin.listen: expected HOST:PORT",
        ),
        (
            """\
            listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
            upstreams: {api: {url: "http://127.0.0.1:9000"}}
            admin: {enabled: no}
            """,
            "ambassador.yaml:3: admin.enabled: expected one of: true, false",
        ),
    ],
)
def test_admin_errors(text: str, message: str) -> None:
    assert error(textwrap.dedent(text)).startswith(message)


def test_admin_port_zero_never_clashes() -> None:
    config = load(
        """\
        listeners: [{listen: 127.0.0.1:0, routes: [{upstream: api}]}]
        upstreams: {api: {url: "http://127.0.0.1:9000"}}
        admin: {listen: 127.0.0.1:0}
        """
    )
    assert config.admin.port == 0


def test_rate_limit_and_quota_sections_map_to_the_model() -> None:
    config = load(
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - name: search
                upstream: api
                rate_limit:
                  rate: 600/m
                  burst: 20
                  key: header:X-Client-Id
                  mode: queue
                  max_wait: 500ms
                  max_queue: 10
                  backend: redis
                  on_backend_failure: deny
                  expected_replicas: 4
              - {name: plain, upstream: api, rate_limit: {rate: 100/h}}
              - {name: leased, upstream: api, rate_limit: {rate: 100/s, backend: redis, lease: 10}}
        upstreams:
          api:
            url: http://127.0.0.1:9000
            quota: {mode: reject, max_wait: 1s, pace_below: 20%, shared: redis}
          other: {url: "http://127.0.0.1:9001"}
        redis: {url: "redis://127.0.0.1:6379/0"}
        """
    )
    search, plain, leased = config.listeners[0].routes
    assert search.rate_limit == RateLimitConfig(
        count=600,
        period_s=60.0,
        burst=20,
        key="header",
        key_header="x-client-id",
        mode="queue",
        max_wait_s=0.5,
        max_queue=10,
        backend="redis",
        on_backend_failure="deny",
        expected_replicas=4,
    )
    assert plain.rate_limit == RateLimitConfig(count=100, period_s=3600.0, burst=1)
    assert leased.rate_limit == RateLimitConfig(count=100, period_s=1.0, burst=100, backend="redis", lease=10)
    assert config.upstreams["api"].quota == QuotaConfig(
        enabled=True, mode="reject", max_wait_s=1.0, pace_below=0.2, shared="redis"
    )
    assert config.upstreams["other"].quota.enabled is False


@pytest.mark.parametrize(
    ("rate_limit", "message"),
    [
        ("{burst: 3}", "listeners[0].routes[0].rate_limit.rate: missing required key"),
        ("{rate: 10/fortnight}", "listeners[0].routes[0].rate_limit.rate: expected a rate like 10/s"),
        ("{rate: 0/s}", "listeners[0].routes[0].rate_limit.rate: a rate needs a count and a period"),
        ("{rate: 10/s, burst: 0}", "listeners[0].routes[0].rate_limit.burst: must be greater than 0"),
        (
            "{rate: 10/s, key: cookie}",
            "rate_limit.key: expected one of: route, upstream, client_ip, header:NAME",
        ),
        ("{rate: 10/s, key: 'header:X Y'}", "rate_limit.key: 'X Y' is not a valid header name"),
        ("{rate: 10/s, mode: wait}", "rate_limit.mode: expected one of: reject, queue"),
        ("{rate: 10/s, backend: redis}", "rate_limit: backend is redis but the config has no redis.url"),
        ("{rate: 10/s, lease: 5}", "rate_limit.lease: a lease needs backend: redis and mode: reject"),
        (
            "{rate: 10/s, backend: redis, mode: queue, lease: 5}",
            "rate_limit.lease: a lease needs backend: redis and mode: reject",
        ),
        (
            "{rate: 10/s, backend: redis, lease: 11}",
            "rate_limit.lease: a lease of 11 is more than the burst (10)",
        ),
        ("{rate: 10/s, backend: redis, lease: -1}", "rate_limit.lease: expected a whole number"),
    ],
)
def test_rate_limit_errors(rate_limit: str, message: str) -> None:
    text = f"""\
        listeners:
          - listen: 127.0.0.1:8000
            routes:
              - upstream: api
                rate_limit: {rate_limit}
        upstreams: {{api: {{url: "http://127.0.0.1:9000"}}}}
        """
    got = error(text)
    assert got.startswith("ambassador.yaml:5: ")
    assert message in got


def test_shared_quota_needs_a_redis_url() -> None:
    message = error(
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams:
          api:
            url: http://127.0.0.1:9000
            quota: {shared: redis}
        """
    )
    assert (
        message == "ambassador.yaml:3: upstreams.api: quota.shared is redis but the config has no redis.url"
    )
