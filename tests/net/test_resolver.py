"""Upstream name resolution: the cache (fresh, stale, negative) with an injected lookup
function and trio's MockClock, connects through several addresses over real loopback sockets
(127.0.0.0/8 all routes to lo on Linux), and both end to end through the daemon."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any, final

import pytest
import trio
import trio.testing

from resilient_ambassador.core.config import DNSConfig, PoolConfig
from resilient_ambassador.core.dns import Address, ip_literal
from resilient_ambassador.core.errors import UpstreamConnectError, UpstreamDNSError
from resilient_ambassador.net.resolver import Resolver, SystemLookup
from tests.support.client import http_request
from tests.support.daemon import simple_config, start_daemon, upstream_config
from tests.support.tcp import greeter, start_tcp_upstream, tcp_config
from tests.support.upstream import Reply, start_fake_upstream

NXDOMAIN = socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@final
class FakeDNS:
    """A lookup function answering from a table the test changes; it records every call.
    While `gate` is set (and not yet fired) lookups wait for it; `hang` never answers."""

    def __init__(self, answers: dict[str, Sequence[str] | OSError]) -> None:
        self.answers = dict(answers)
        self.calls: list[str] = []
        self.gate: trio.Event | None = None
        self.hang = False

    async def __call__(self, host: str) -> list[Address]:
        self.calls.append(host)
        if self.hang:
            await trio.sleep_forever()
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        answer = self.answers[host]
        if isinstance(answer, OSError):
            raise answer
        out = [ip_literal(ip) for ip in answer]
        assert all(a is not None for a in out)
        return [a for a in out if a is not None]


def ips(resolver_answer: Sequence[Address]) -> list[str]:
    return [a.ip for a in resolver_answer]


async def started(nursery: trio.Nursery, resolver: Resolver) -> Resolver:
    await nursery.start(resolver.run)
    return resolver


@contextlib.contextmanager
def listening(host: str, port: int = 0, backlog: int = 16) -> Iterator[socket.socket]:
    """A bare listening socket: the kernel completes handshakes without an accept."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    try:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if family == socket.AF_INET6:
                pytest.skip(f"no IPv6 loopback here: {exc}")
            raise
        sock.listen(backlog)
        yield sock
    finally:
        sock.close()


# -- the cache ---------------------------------------------------------------------------------


async def test_a_fresh_answer_costs_no_lookup(nursery: trio.Nursery) -> None:
    dns = FakeDNS({"api.test": ["10.0.0.1", "10.0.0.2"]})
    resolver = await started(nursery, Resolver(DNSConfig(), dns))

    first = await resolver.resolve("api.test")
    second = await resolver.resolve("api.test")

    assert second is first
    assert ips(first.addresses) == ["10.0.0.1", "10.0.0.2"]
    assert dns.calls == ["api.test"]
    assert (resolver.stats.lookups, resolver.stats.hits, resolver.entries) == (1, 1, 1)


async def test_concurrent_misses_share_one_lookup(nursery: trio.Nursery) -> None:
    dns = FakeDNS({"api.test": ["10.0.0.1"]})
    dns.gate = trio.Event()
    resolver = await started(nursery, Resolver(DNSConfig(), dns))
    answers: list[list[str]] = []

    async def resolve() -> None:
        answers.append(ips((await resolver.resolve("api.test")).addresses))

    async with trio.open_nursery() as callers:
        for _ in range(20):
            callers.start_soon(resolve)
        await trio.testing.wait_all_tasks_blocked()
        dns.gate.set()

    assert answers == [["10.0.0.1"]] * 20
    assert dns.calls == ["api.test"]


async def test_an_expired_answer_is_served_while_one_task_refreshes_it(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    dns = FakeDNS({"api.test": ["10.0.0.1"]})
    resolver = await started(nursery, Resolver(DNSConfig(max_ttl_s=30.0), dns))
    await resolver.resolve("api.test")
    dns.answers["api.test"] = ["10.0.0.2"]
    dns.gate = trio.Event()

    mock_clock.jump(29.9)
    assert ips((await resolver.resolve("api.test")).addresses) == ["10.0.0.1"]
    assert len(dns.calls) == 1  # still fresh
    mock_clock.jump(0.2)
    for _ in range(5):  # stale: served at once, without waiting for the refresh
        assert ips((await resolver.resolve("api.test")).addresses) == ["10.0.0.1"]
    await trio.testing.wait_all_tasks_blocked()
    assert len(dns.calls) == 2  # one refresh for the five
    assert (resolver.stats.refreshes, resolver.stats.stale_served) == (1, 5)

    dns.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert ips((await resolver.resolve("api.test")).addresses) == ["10.0.0.2"]
    assert len(dns.calls) == 2


async def test_a_failing_refresh_keeps_the_old_answer_for_max_stale_then_fails(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    dns = FakeDNS({"api.test": ["10.0.0.1"]})
    config = DNSConfig(max_ttl_s=30.0, negative_ttl_s=2.0, max_stale_s=10.0)
    resolver = await started(nursery, Resolver(config, dns))
    await resolver.resolve("api.test")
    dns.answers["api.test"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    mock_clock.jump(30.0)
    await resolver.resolve("api.test")  # stale; starts a refresh, which fails
    await trio.testing.wait_all_tasks_blocked()
    assert (len(dns.calls), resolver.stats.failures) == (2, 1)
    mock_clock.jump(1.0)
    assert ips((await resolver.resolve("api.test")).addresses) == ["10.0.0.1"]
    await trio.testing.wait_all_tasks_blocked()
    assert len(dns.calls) == 2  # no new refresh within negative_ttl of the failure
    mock_clock.jump(1.0)
    await resolver.resolve("api.test")
    await trio.testing.wait_all_tasks_blocked()
    assert len(dns.calls) == 3

    mock_clock.jump(8.0)  # 40 s: past max_ttl + max_stale
    with pytest.raises(UpstreamDNSError) as info:
        await resolver.resolve("api.test", upstream="api")
    assert info.value.message == (
        "upstream DNS resolution failed for api.test: Temporary failure in name resolution (EAI_AGAIN)"
    )
    assert info.value.upstream == "api"


async def test_a_failure_is_cached_for_negative_ttl(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    dns = FakeDNS({"gone.test": NXDOMAIN})
    resolver = await started(nursery, Resolver(DNSConfig(negative_ttl_s=2.0), dns))

    for _ in range(3):
        with pytest.raises(UpstreamDNSError, match=r"gone\.test: Name or service not known \(EAI_NONAME\)"):
            await resolver.resolve("gone.test")
    assert dns.calls == ["gone.test"]
    assert (resolver.stats.failures, resolver.stats.negative_hits) == (1, 2)

    dns.answers["gone.test"] = ["10.0.0.9"]
    mock_clock.jump(2.0)
    assert ips((await resolver.resolve("gone.test")).addresses) == ["10.0.0.9"]
    assert len(dns.calls) == 2


async def test_a_hung_lookup_is_a_dns_error_after_the_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    dns = FakeDNS({})
    dns.hang = True
    resolver = await started(nursery, Resolver(DNSConfig(timeout_s=2.0), dns))

    start = trio.current_time()
    with pytest.raises(UpstreamDNSError, match=r"api\.test: no answer within 2s"):
        await resolver.resolve("api.test")
    assert trio.current_time() - start == pytest.approx(2.0)


async def test_an_empty_answer_is_a_dns_error(nursery: trio.Nursery) -> None:
    resolver = await started(nursery, Resolver(DNSConfig(), FakeDNS({"api.test": []})))
    with pytest.raises(UpstreamDNSError, match="no A or AAAA records"):
        await resolver.resolve("api.test")


async def test_a_bad_name_is_a_dns_error_not_a_crash(nursery: trio.Nursery) -> None:
    resolver = await started(nursery, Resolver(DNSConfig()))
    with pytest.raises(UpstreamDNSError, match=r"failed for a\.\.b"):
        await resolver.resolve("a..b")  # getaddrinfo's IDNA codec refuses the empty label


async def test_max_stale_zero_looks_the_name_up_before_connecting(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    dns = FakeDNS({"api.test": ["10.0.0.1"]})
    resolver = await started(nursery, Resolver(DNSConfig(max_ttl_s=30.0, max_stale_s=0.0), dns))
    await resolver.resolve("api.test")
    dns.answers["api.test"] = ["10.0.0.2"]

    mock_clock.jump(30.0)
    assert ips((await resolver.resolve("api.test")).addresses) == ["10.0.0.2"]
    assert resolver.stats.stale_served == 0


async def test_without_the_background_runner_lookups_run_in_the_caller(
    mock_clock: trio.testing.MockClock,
) -> None:
    dns = FakeDNS({"api.test": ["10.0.0.1"]})
    resolver = Resolver(DNSConfig(max_ttl_s=30.0), dns)  # run() never started
    await resolver.resolve("api.test")
    dns.answers["api.test"] = ["10.0.0.2"]

    mock_clock.jump(31.0)
    assert ips((await resolver.resolve("api.test")).addresses) == ["10.0.0.2"]
    assert len(dns.calls) == 2


async def test_localhost_resolves_with_the_system_resolver() -> None:
    addresses = await SystemLookup()("localhost")
    assert "127.0.0.1" in ips(addresses)
    assert len(set(addresses)) == len(addresses)
    assert ips(await SystemLookup()("::1")) == ["::1"]


async def test_hung_system_lookups_hold_at_most_their_own_threads(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """getaddrinfo stuck (an unreachable CoreDNS): abandoned lookups keep their threads until
    it returns; they may hold no more than the lookup limiter's, and a lookup that gets none
    fails at its timeout like a slow one."""
    unstuck = threading.Event()

    def stuck_getaddrinfo(*_args: object) -> list[Any]:
        unstuck.wait()
        return []

    lookup = SystemLookup(max_threads=2, getaddrinfo=stuck_getaddrinfo)
    resolver = await started(nursery, Resolver(DNSConfig(timeout_s=2.0), lookup))
    try:
        for name in ("a.test", "b.test", "c.test"):
            with pytest.raises(UpstreamDNSError, match="no answer within 2s"):
                await resolver.resolve(name)
        assert lookup.limiter.borrowed_tokens == 2  # the third never got a thread
        assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
    finally:
        unstuck.set()


# -- connecting through the answer -------------------------------------------------------------


async def test_ip_literals_bypass_the_resolver() -> None:
    dns = FakeDNS({})
    resolver = Resolver(DNSConfig(), dns)
    with listening("127.0.0.1") as server:
        port = server.getsockname()[1]
        stream = await resolver.connect("127.0.0.1", port, upstream="up")
        with stream.socket:
            assert stream.socket.getpeername() == ("127.0.0.1", port)
    assert dns.calls == []
    assert resolver.entries == 0


async def test_connect_moves_on_to_the_next_address_and_prefers_it_next_time() -> None:
    dns = FakeDNS({"svc.test": ["127.0.0.2", "127.0.0.1"]})
    resolver = Resolver(DNSConfig(), dns)
    with listening("127.0.0.1") as server:  # nothing listens on 127.0.0.2: refused
        port = server.getsockname()[1]
        for _ in range(3):
            stream = await resolver.connect("svc.test", port, upstream="svc")
            with stream.socket:
                assert stream.socket.getpeername() == ("127.0.0.1", port)
    # Only the first connect paid for the dead address; then it is tried last.
    assert resolver.stats.connect_failures == 1
    assert dns.calls == ["svc.test"]


async def test_connect_rotates_over_healthy_addresses() -> None:
    with listening("127.0.0.1") as one:
        port = one.getsockname()[1]
        with listening("127.0.0.3", port):
            resolver = Resolver(DNSConfig(), FakeDNS({"svc.test": ["127.0.0.1", "127.0.0.3"]}))
            peers = []
            for _ in range(4):
                stream = await resolver.connect("svc.test", port, upstream="svc")
                with stream.socket:
                    peers.append(stream.socket.getpeername()[0])
    assert peers == ["127.0.0.1", "127.0.0.3", "127.0.0.1", "127.0.0.3"]


async def test_a_dual_stack_answer_falls_back_across_families() -> None:
    with listening("::1") as server:  # nothing on 127.0.0.2 at that port
        port = server.getsockname()[1]
        resolver = Resolver(DNSConfig(), FakeDNS({"svc.test": ["127.0.0.2", "::1"]}))
        stream = await resolver.connect("svc.test", port, upstream="svc")
        with stream.socket:
            assert stream.socket.getpeername()[:2] == ("::1", port)
    assert resolver.stats.connect_failures == 1


async def test_no_address_connecting_is_one_clear_error() -> None:
    with listening("127.0.0.1") as server:
        port = server.getsockname()[1]  # 127.0.0.2 and .3 have no listener on it
        resolver = Resolver(DNSConfig(), FakeDNS({"svc.test": ["127.0.0.2", "127.0.0.3"]}))
        with pytest.raises(UpstreamConnectError) as info:
            await resolver.connect("svc.test", port, upstream="svc")
    assert info.value.message == (
        f"connect to svc.test:{port} failed: all 2 addresses failed: "
        "127.0.0.2: Connection refused; 127.0.0.3: Connection refused"
    )
    assert type(info.value) is UpstreamConnectError
    assert resolver.stats.connect_failures == 2


async def test_a_blackholed_address_costs_one_stagger_delay_not_the_connect_timeout(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    with listening("127.0.0.1") as live:
        port = live.getsockname()[1]
        # listen(0) with one connection already queued: Linux drops further SYNs, so a connect
        # there hangs like one to a dead host.
        with listening("127.0.0.3", port, backlog=0), socket.create_connection(("127.0.0.3", port)):
            resolver = Resolver(DNSConfig(), FakeDNS({"svc.test": ["127.0.0.3", "127.0.0.1"]}))
            connected: list[trio.SocketStream] = []

            async def connect() -> None:
                connected.append(await resolver.connect("svc.test", port, upstream="svc"))

            nursery.start_soon(connect)
            waited_s = 0.0
            while True:
                await trio.testing.wait_all_tasks_blocked()
                if connected:
                    break
                assert waited_s < 1.0, "the second address was not tried"
                mock_clock.jump(0.05)
                waited_s += 0.05
            with connected[0].socket:
                assert connected[0].socket.getpeername() == ("127.0.0.1", port)
    assert 0.25 - 1e-9 <= waited_s < 0.5  # RFC 8305: the next attempt starts after 250 ms
    assert resolver.stats.connect_failures == 0  # the hanging attempt was cancelled, not failed


# -- end to end through the daemon -------------------------------------------------------------


async def _stats(admin_port: int) -> dict[str, int]:
    response = await http_request(admin_port, "GET", "/stats")
    dns: dict[str, int] = json.loads(response.body)["dns"]
    return dns


async def test_the_daemon_connects_through_the_second_address(nursery: trio.Nursery) -> None:
    upstream = await start_fake_upstream(nursery, default=Reply(close_after=True))
    dns = FakeDNS({"api.test": ["127.0.0.2", "127.0.0.1"]})
    config = simple_config(upstream_config(f"http://api.test:{upstream.port}"))
    daemon = await start_daemon(nursery, config, resolver=Resolver(config.dns, dns))

    for _ in range(2):
        response = await http_request(daemon.port, "GET", "/hello")
        assert (response.status, response.body) == (200, b"ok")

    assert [r.target for r in upstream.received] == [b"/hello", b"/hello"]
    assert upstream.received[0].header("host") == f"api.test:{upstream.port}"
    stats = await _stats(daemon.admin_port)
    assert (stats["entries"], stats["lookups"], stats["hits"]) == (1, 1, 1)
    assert stats["connect_failures"] == 1


async def test_new_connections_follow_a_changed_answer_after_max_ttl(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    first = await start_fake_upstream(nursery, default=Reply(close_after=True))
    second = await start_fake_upstream(
        nursery, default=Reply(close_after=True), host="127.0.0.3", port=first.port
    )
    dns = FakeDNS({"api.test": ["127.0.0.1"]})
    config = simple_config(upstream_config(f"http://api.test:{first.port}"))
    daemon = await start_daemon(nursery, config, resolver=Resolver(DNSConfig(max_ttl_s=5.0), dns))

    async def get() -> None:
        assert (await http_request(daemon.port, "GET", "/")).status == 200

    await get()
    dns.answers["api.test"] = ["127.0.0.3"]
    mock_clock.jump(4.9)
    await get()  # fresh: no lookup
    assert len(dns.calls) == 1
    mock_clock.jump(0.2)
    await get()  # stale: served by the old answer while one refresh runs
    await trio.testing.wait_all_tasks_blocked()
    assert len(dns.calls) == 2
    await get()
    await get()

    assert (len(first.received), len(second.received)) == (3, 2)


async def test_with_max_stale_zero_the_first_connection_after_max_ttl_goes_to_the_new_answer(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    first = await start_fake_upstream(nursery, default=Reply(close_after=True))
    second = await start_fake_upstream(
        nursery, default=Reply(close_after=True), host="127.0.0.3", port=first.port
    )
    dns = FakeDNS({"api.test": ["127.0.0.1"]})
    config = simple_config(upstream_config(f"http://api.test:{first.port}"))
    resolver = Resolver(DNSConfig(max_ttl_s=5.0, max_stale_s=0.0), dns)
    daemon = await start_daemon(nursery, config, resolver=resolver)

    assert (await http_request(daemon.port)).status == 200
    dns.answers["api.test"] = ["127.0.0.3"]
    mock_clock.jump(5.0)
    assert (await http_request(daemon.port)).status == 200

    assert (len(first.received), len(second.received)) == (1, 1)


async def test_a_dns_failure_is_a_502_and_cached_briefly(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    dns = FakeDNS({"gone.test": NXDOMAIN})
    config = simple_config(upstream_config("http://gone.test:8080"))
    daemon = await start_daemon(nursery, config, resolver=Resolver(config.dns, dns))

    for _ in range(3):
        response = await http_request(daemon.port)
        assert response.status == 502
        assert response.header("x-ambassador-error") == "upstream_dns_failed"
        assert json.loads(response.body)["message"] == (
            "upstream DNS resolution failed for gone.test: Name or service not known (EAI_NONAME)"
        )
    assert dns.calls == ["gone.test"]  # one lookup for three requests
    mock_clock.jump(config.dns.negative_ttl_s)
    assert (await http_request(daemon.port)).status == 502
    assert len(dns.calls) == 2
    stats = await _stats(daemon.admin_port)
    assert (stats["lookups"], stats["failures"], stats["negative_hits"]) == (2, 2, 2)


async def test_localhost_upstream_end_to_end(nursery: trio.Nursery) -> None:
    """The real resolver: localhost may answer ::1 first; the upstream listens on 127.0.0.1."""
    upstream = await start_fake_upstream(nursery)
    daemon = await start_daemon(nursery, simple_config(upstream_config(f"http://localhost:{upstream.port}")))

    response = await http_request(daemon.port, "GET", "/x")

    assert (response.status, response.body) == (200, b"ok")
    assert (await _stats(daemon.admin_port))["lookups"] == 1


async def test_the_tcp_relay_resolves_through_the_shared_resolver(nursery: trio.Nursery) -> None:
    upstream = await start_tcp_upstream(nursery, greeter(b"hi|"))
    dns = FakeDNS({"db.test": ["127.0.0.2", "127.0.0.1"]})
    config = tcp_config([f"tcp://db.test:{upstream.port}"])
    daemon = await start_daemon(nursery, config, resolver=Resolver(config.dns, dns))

    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
        async with stream:
            assert await stream.receive_some(16) == b"hi|"
    assert dns.calls == ["db.test"]
    assert daemon.app.resolver.stats.connect_failures == 1


async def test_a_reload_keeps_the_resolver_and_its_cache(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = await start_fake_upstream(nursery, default=Reply(close_after=True))
    dns = FakeDNS({"api.test": ["127.0.0.1"]})
    config = simple_config(upstream_config(f"http://api.test:{upstream.port}"))
    daemon = await start_daemon(nursery, config, resolver=Resolver(config.dns, dns))
    assert (await http_request(daemon.port)).status == 200
    old_pool = daemon.app.pools["up"]

    main = dataclasses.replace(config.listeners[0], port=daemon.port)
    changed_upstream = dataclasses.replace(config.upstreams["up"], pool=PoolConfig(max_connections=5))
    await daemon.app.reload(
        dataclasses.replace(
            config, listeners=(main,), upstreams={"up": changed_upstream}, dns=DNSConfig(max_ttl_s=1.0)
        )
    )

    assert daemon.app.pools["up"] is not old_pool  # a new pool, the same resolver
    assert daemon.app.config.dns == config.dns
    assert "dns changed; that takes effect at the next restart" in caplog.text
    assert (await http_request(daemon.port)).status == 200
    assert dns.calls == ["api.test"]
