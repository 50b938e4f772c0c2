"""Config for tcp listeners: the relay section, its checks, the tcp:// / tls:// one-liner."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from resilient_ambassador.config_loader import (
    ConfigError,
    config_from_flags,
    load_config,
    load_config_text,
    parse_upstream_url,
)
from resilient_ambassador.core.config import (
    BreakerConfig,
    ListenerConfig,
    ListenerTLS,
    RelayConfig,
    TLSConfig,
    UpstreamURL,
)
from resilient_ambassador.core.redact import config_document
from resilient_ambassador.secrets import SecretResolver
from tests.support.tls import make_tls_material

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(text: str) -> ListenerConfig:
    config = load_config_text(textwrap.dedent(text), "ambassador.yaml", SecretResolver(environ={}))
    return config.listeners[0]


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    return str(info.value)


def test_full_relay_section(tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path)
    server_cert, server_key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    tls.server_cert.cert_chain_pems[0].write_to_path(str(server_cert))
    tls.server_cert.private_key_pem.write_to_path(str(server_key))
    listener = load(
        f"""\
        listeners:
          - name: db
            listen: 127.0.0.1:5433
            protocol: tcp
            tls: {{cert_file: {server_cert}, key_file: {server_key}}}
            relay:
              upstreams: [tls://db.example.com:5432, "tcp://[::1]:5432", tls://db2.example.com]
              balance: round_robin
              connect_timeout: 2s
              idle_timeout: 10m
              tls:
                ca_file: {tls.ca_file}
                cert_file: {tls.client_cert_file}
                key_file: {tls.client_key_file}
                server_name: db.internal
                min_version: 1.3
              max_connections: 50
              on_limit: queue
              queue_timeout: 500ms
              connection_rate: 600/m
              breaker: {{failure_threshold: 3, reset_timeout: 5s}}
        """
    )

    assert listener == ListenerConfig(
        name="db",
        host="127.0.0.1",
        port=5433,
        protocol="tcp",
        relay=RelayConfig(
            upstreams=(
                UpstreamURL("tls", "db.example.com", 5432),
                UpstreamURL("tcp", "::1", 5432),
                UpstreamURL("tls", "db2.example.com", 443),
            ),
            balance="round_robin",
            connect_timeout_s=2.0,
            idle_timeout_s=600.0,
            tls=TLSConfig(
                ca_file=str(tls.ca_file),
                cert_file=str(tls.client_cert_file),
                key_file=str(tls.client_key_file),
                server_name="db.internal",
                min_version="1.3",
            ),
            max_connections=50,
            on_limit="queue",
            queue_timeout_s=0.5,
            connection_rate=(600.0, 60.0),
            breaker=BreakerConfig(failure_threshold=3, reset_timeout_s=5.0),
        ),
        tls=ListenerTLS(str(server_cert), str(server_key)),
    )


def test_tcp_only_config_needs_no_upstreams_and_defaults_are_safe() -> None:
    listener = load(
        """\
        listeners:
          - listen: 127.0.0.1:5433
            protocol: tcp
            relay: {upstreams: [tls://api.example.com:443]}
        """
    )
    assert listener.relay is not None
    assert listener.relay.tls.verify is True
    assert (listener.relay.max_connections, listener.relay.on_limit) == (1000, "refuse")
    assert listener.relay.connection_rate is None
    assert listener.tls is None


def test_example_config_loads() -> None:
    config = load_config(EXAMPLES / "tcp-relay.yaml", SecretResolver(environ={}))
    assert [listener.protocol for listener in config.listeners] == ["tcp", "tcp"]
    doc = config_document(config)  # /config renders it
    listeners = doc["listeners"]
    assert isinstance(listeners, list)
    assert isinstance(listeners[0], dict)
    relay = listeners[0]["relay"]
    assert isinstance(relay, dict)
    assert relay["upstreams"] == [
        "tls://redis-primary.example.com:6380",
        "tls://redis-replica.example.com:6380",
    ]


HTTP_UPSTREAMS = 'upstreams: {api: {url: "http://127.0.0.1:9000"}}\n'

ERRORS = {
    "relay missing": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
        """,
        "ambassador.yaml:2: listeners[0].relay: missing required key (a tcp listener relays)",
    ),
    "routes on tcp": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay: {upstreams: ["tcp://a:1"]}
            limits: {max_connections: 5}
        """,
        "ambassador.yaml:5: listeners[0].limits: not for a tcp listener (it has a relay section)",
    ),
    "relay on http": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            routes: [{upstream: api}]
            relay: {upstreams: ["tcp://a:1"]}
        """
        + HTTP_UPSTREAMS,
        "ambassador.yaml:4: listeners[0].relay: only for protocol: tcp listeners",
    ),
    "http listener still needs routes": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
        """
        + HTTP_UPSTREAMS,
        "ambassador.yaml:2: listeners[0].routes: missing required key",
    ),
    "http address in relay": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay:
              upstreams:
                - tcp://a:1
                - http://a:80
        """,
        "ambassador.yaml:7: listeners[0].relay.upstreams[1]: expected an address like "
        "tcp://db.example.com:5432 or tls://api.example.com:443",
    ),
    "tcp without port": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay: {upstreams: ["tcp://a"]}
        """,
        "ambassador.yaml:4: listeners[0].relay.upstreams[0]: a tcp:// address needs a port, "
        "like tcp://db.example.com:5432",
    ),
    "empty upstreams": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay: {upstreams: []}
        """,
        "ambassador.yaml:4: listeners[0].relay.upstreams: expected a non-empty list",
    ),
    "tls without tls address": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay:
              upstreams: ["tcp://a:1"]
              tls: {server_name: a}
        """,
        "ambassador.yaml:6: listeners[0].relay.tls: tls is set but no upstream address is tls://",
    ),
    "bad ca file": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay:
              upstreams: ["tls://a:1"]
              tls: {ca_file: /nonexistent/ca.pem}
        """,
        "ambassador.yaml:6: listeners[0].relay.tls: cannot load the TLS files: "
        "[Errno 2] No such file or directory",
    ),
    "listener tls needs both files": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            tls: {cert_file: /a.pem}
            relay: {upstreams: ["tcp://a:1"]}
        """,
        "ambassador.yaml:4: listeners[0].tls.key_file: missing required key",
    ),
    "bad balance": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay: {upstreams: ["tcp://a:1"], balance: random}
        """,
        "ambassador.yaml:4: listeners[0].relay.balance: expected one of: ordered, round_robin",
    ),
    "bad on_limit": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay: {upstreams: ["tcp://a:1"], on_limit: wait}
        """,
        "ambassador.yaml:4: listeners[0].relay.on_limit: expected one of: refuse, queue",
    ),
    "bad connection rate": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay:
              upstreams: ["tcp://a:1"]
              connection_rate: lots
        """,
        "ambassador.yaml:6: listeners[0].relay.connection_rate: expected a rate like 10/s, 600/m, 10000/h",
    ),
    "zero max connections": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay: {upstreams: ["tcp://a:1"], max_connections: 0}
        """,
        "ambassador.yaml:4: listeners[0].relay.max_connections: must be greater than 0",
    ),
    "unknown relay key": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay: {upstreams: ["tcp://a:1"], idle: 5s}
        """,
        "ambassador.yaml:4: listeners[0].relay.idle: unknown key (expected one of: balance, "
        "connect_timeout, idle_timeout, max_connections, on_limit, queue_timeout, connection_rate, "
        "breaker, upstreams, tls)",
    ),
    "shared relay breaker": (
        """\
        listeners:
          - listen: 127.0.0.1:8000
            protocol: tcp
            relay:
              upstreams: ["tcp://a:1"]
              breaker: {shared: redis}
        """,
        "ambassador.yaml:6: listeners[0].relay.breaker.shared: sharing is not supported for a tcp "
        "listener's breaker yet (use none)",
    ),
    "tcp address as an http upstream url": (
        """\
        listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: api}]}]
        upstreams: {api: {url: "tcp://a:1"}}
        """,
        "ambassador.yaml:2: upstreams.api.url: tcp:// addresses belong in a tcp listener's relay.upstreams",
    ),
}


@pytest.mark.parametrize(("text", "message"), ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_file_line_and_key_path(text: str, message: str) -> None:
    assert error(text).startswith(message)


def test_one_liner_tcp_and_tls() -> None:
    tcp = config_from_flags("127.0.0.1:5433", "tcp://db:5432", [])
    tls = config_from_flags("127.0.0.1:8443", "tls://api.example.com", [])

    assert tcp.listeners == (
        ListenerConfig(
            "main", "127.0.0.1", 5433, "tcp", relay=RelayConfig((UpstreamURL("tcp", "db", 5432),))
        ),
    )
    assert tcp.upstreams == {}
    relay = tls.listeners[0].relay
    assert relay is not None
    assert relay.upstreams == (UpstreamURL("tls", "api.example.com", 443),)
    assert str(relay.upstreams[0]) == "tls://api.example.com:443"


def test_http_upstream_url_still_refuses_tcp() -> None:
    with pytest.raises(ValueError, match=r"relay\.upstreams"):
        parse_upstream_url("tls://a:443")
