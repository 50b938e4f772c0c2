"""Hot reload: a new config swaps in while traffic flows; a bad one changes nothing."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import trio

from resilient_ambassador.app import ReloadError, _reload_on_signal
from resilient_ambassador.config_loader import ConfigError
from resilient_ambassador.core.config import BreakerConfig, Config, ListenerConfig, RouteConfig
from tests.support.client import HttpClient, http_request
from tests.support.daemon import RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.process import free_port as _free_port
from tests.support.upstream import FakeUpstream, Reply, start_fake_upstream

BREAKER = BreakerConfig(failure_threshold=3, min_requests=0, reset_timeout_s=30.0)


async def _two_upstreams(nursery: trio.Nursery) -> tuple[FakeUpstream, FakeUpstream]:
    a = await start_fake_upstream(nursery, default=Reply(body=b"from-a"))
    b = await start_fake_upstream(nursery, default=Reply(body=b"from-b"))
    return a, b


def _pinned(config: Config, daemon: RunningDaemon) -> Config:
    """`config` with listener "main" on the port the daemon is already serving."""
    listeners = tuple(
        dataclasses.replace(lst, port=daemon.port) if lst.name == "main" else lst for lst in config.listeners
    )
    return dataclasses.replace(config, listeners=listeners)


def _routed_to(config: Config, upstream: str) -> Config:
    main = dataclasses.replace(config.listeners[0], routes=(RouteConfig(upstream=upstream, name="r"),))
    return dataclasses.replace(config, listeners=(main, *config.listeners[1:]))


async def test_reload_while_traffic_flows_loses_no_request(nursery: trio.Nursery) -> None:
    a, b = await _two_upstreams(nursery)
    config = simple_config(
        upstream_config(a.url(), name="a", breaker=BREAKER),
        extra_upstreams=[upstream_config(b.url(), name="b")],
    )
    daemon = await start_daemon(nursery, config)
    kept_breaker, kept_pool = daemon.app.breakers["a"], daemon.app.pools["a"]
    a.script(Reply(delay_s=0.3, body=b"slow-from-a"))
    bodies: list[bytes] = []
    statuses: list[int] = []
    reloaded = trio.Event()

    async def keep_asking(client_no: int) -> None:
        async with await HttpClient.connect(daemon.port) as client:
            for _ in range(30):
                response = await client.request("GET", f"/{client_no}")
                statuses.append(response.status)
                bodies.append(response.body)
                if reloaded.is_set() and response.body == b"from-b":
                    return

    async with trio.open_nursery() as clients:
        for i in range(4):
            clients.start_soon(keep_asking, i)
        await a.wait_received(4)  # the slow one is in flight
        await daemon.app.reload(_pinned(_routed_to(config, "b"), daemon))
        reloaded.set()
        after = await http_request(daemon.port, "GET", "/new")

    assert set(statuses) == {200}
    assert b"slow-from-a" in bodies  # in flight across the reload: finished on the old route
    assert after.body == b"from-b"
    assert daemon.app.breakers["a"] is kept_breaker  # unchanged upstream: same breaker, same pool
    assert daemon.app.pools["a"] is kept_pool
    assert daemon.app.reloads == 1


async def test_a_changed_upstream_gets_a_new_breaker(nursery: trio.Nursery) -> None:
    a, _ = await _two_upstreams(nursery)
    config = simple_config(upstream_config(a.url(), name="a", breaker=BREAKER))
    daemon = await start_daemon(nursery, config)
    before = daemon.app.breakers["a"]
    changed = dataclasses.replace(
        config.upstreams["a"], breaker=dataclasses.replace(BREAKER, failure_threshold=9)
    )
    await daemon.app.reload(_pinned(dataclasses.replace(config, upstreams={"a": changed}), daemon))
    assert daemon.app.breakers["a"] is not before
    assert (await http_request(daemon.port, "GET", "/")).body == b"from-a"


async def test_listeners_are_added_and_removed(nursery: trio.Nursery) -> None:
    a, _ = await _two_upstreams(nursery)
    config = simple_config(upstream_config(a.url(), name="a"))
    daemon = await start_daemon(nursery, config)
    extra = ListenerConfig(
        name="extra", host="127.0.0.1", port=_free_port(), routes=(RouteConfig(upstream="a"),)
    )

    await daemon.app.reload(
        _pinned(dataclasses.replace(config, listeners=(*config.listeners, extra)), daemon)
    )
    added = await http_request(extra.port, "GET", "/")
    await daemon.app.reload(_pinned(config, daemon))
    await trio.testing.wait_all_tasks_blocked()

    assert added.body == b"from-a"
    with pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", extra.port)
    assert (await http_request(daemon.port, "GET", "/")).status == 200


async def test_a_port_in_use_fails_the_reload_and_changes_nothing(nursery: trio.Nursery) -> None:
    a, b = await _two_upstreams(nursery)
    config = simple_config(
        upstream_config(a.url(), name="a"), extra_upstreams=[upstream_config(b.url(), name="b")]
    )
    daemon = await start_daemon(nursery, config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        extra = ListenerConfig(
            name="extra", host="127.0.0.1", port=taken.getsockname()[1], routes=(RouteConfig(upstream="b"),)
        )
        broken = _routed_to(dataclasses.replace(config, listeners=(*config.listeners, extra)), "b")
        with pytest.raises(ReloadError, match="cannot bind"):
            await daemon.app.reload(_pinned(broken, daemon))

    assert (await http_request(daemon.port, "GET", "/")).body == b"from-a"  # the old routes stay
    stats = daemon.app.stats()
    assert stats["reloads"] == {"succeeded": 0, "failed": 1}


async def test_an_invalid_config_on_sighup_is_logged_and_counted(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = await _two_upstreams(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(a.url(), name="a")))

    def broken() -> Config:
        raise ConfigError("ambassador.yaml:7: upstreams.a.timeouts.connect: expected a duration")

    await _reload_on_signal(daemon.app, broken)

    assert daemon.app.reload_failures == 1
    assert "upstreams.a.timeouts.connect" in caplog.text
    assert (await http_request(daemon.port, "GET", "/")).body == b"from-a"
