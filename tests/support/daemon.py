"""Start the real daemon (`App`) in-process on ephemeral loopback ports for end-to-end tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, final

import trio

from resilient_ambassador.app import App
from resilient_ambassador.config_loader import parse_upstream_url
from resilient_ambassador.core.config import (
    AdminConfig,
    BreakerConfig,
    ClientLimits,
    Config,
    DrainConfig,
    ListenerConfig,
    RetryConfig,
    RouteConfig,
    TLSConfig,
    UpstreamConfig,
)
from resilient_ambassador.core.templates import Template
from resilient_ambassador.net.resolver import Resolver
from resilient_ambassador.secrets import SecretResolver
from resilient_ambassador.telemetry import Telemetry

# Forwarding tests see each attempt as it is; resilience tests opt in to the policies.
NO_BREAKER = BreakerConfig(enabled=False)
NO_RETRY = RetryConfig(retries=0)
# Tests run in parallel: the admin listener takes an ephemeral port, never the fixed default.
TEST_ADMIN = AdminConfig(port=0)


def upstream_config(url: str, name: str = "up", **fields: Any) -> UpstreamConfig:
    """An UpstreamConfig for a test upstream URL such as `FakeUpstream.url()`; no breaker
    unless `breaker=` is given."""
    fields.setdefault("breaker", NO_BREAKER)
    return UpstreamConfig(name=name, url=parse_upstream_url(url), **fields)


def simple_config(
    upstream: UpstreamConfig,
    *,
    routes: Sequence[RouteConfig] | None = None,
    limits: ClientLimits | None = None,
    extra_upstreams: Sequence[UpstreamConfig] = (),
    grace_period_s: float = 5.0,
    retry: RetryConfig | None = None,
    admin: AdminConfig = TEST_ADMIN,
) -> Config:
    """One listener on an ephemeral port, the admin listener on another; the default route
    has no retries unless `retry=`."""
    return Config(
        listeners=(
            ListenerConfig(
                name="main",
                host="127.0.0.1",
                port=0,
                routes=tuple(routes)
                if routes is not None
                else (RouteConfig(upstream=upstream.name, retry=retry or NO_RETRY),),
                limits=limits or ClientLimits(),
            ),
        ),
        upstreams={u.name: u for u in (upstream, *extra_upstreams)},
        drain=DrainConfig(grace_period_s=grace_period_s),
        admin=admin,
    )


@final
@dataclasses.dataclass
class RunningDaemon:
    app: App
    port: int

    @property
    def admin_port(self) -> int:
        return self.app.admin_addresses[0][1]


async def start_daemon(
    nursery: trio.Nursery,
    config: Config,
    secrets: SecretResolver | None = None,
    telemetry: Telemetry | None = None,
    resolver: Resolver | None = None,
) -> RunningDaemon:
    # A fixed admin port would make parallel tests clash; see TEST_ADMIN.
    assert not config.admin.enabled or config.admin.port == 0, "tests must use admin port 0"
    app = App(config, secrets, telemetry=telemetry, resolver=resolver)
    addresses: list[tuple[str, int]] = await nursery.start(app.serve)
    return RunningDaemon(app=app, port=addresses[0][1])


__all__ = ["TLSConfig", "Template", "simple_config", "start_daemon", "upstream_config"]
