"""Issue #11's Redis fault matrix: every Redis-backed feature x every Redis fault, end to end.

Each case runs two real daemons (`App` in-process, on loopback ports: two pods) in front of one
fake upstream, sharing a private redis-server on a free port; only the feature under test uses
Redis. It injects the fault, drives traffic through both daemons for the fault window while
recording every response's status and wall-clock latency, heals Redis, then proves the feature
shares state through Redis again (B sees what A did). Asserted for every case:

- no 5xx (every request in the window answers 200: each feature's fallback is local state);
- the worst latency in the window is within the feature's Redis cost (the sequential Redis calls
  a request may wait on, each bounded by `redis.timeout`) plus `MARGIN_S`;
- the fault reached the feature (a fallback or sync error was counted: the case is not vacuous),
  and nothing was logged at ERROR (no exception escaped a Redis call);
- readiness stays "ready" through the fault;
- after healing, both daemons serve and sharing resumes within `RECOVERY_S`.

Timing is on the wall clock: Redis is a real process and the faults are real (SIGKILL, SIGSTOP,
CLIENT PAUSE), so MockClock cannot drive them. The windows are chosen so that a request that
waited on Redis for the whole fault would blow the bound by a clear factor.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import pytest
import trio

from resilient_ambassador.core.config import (
    BreakerConfig,
    CacheStoreConfig,
    Config,
    QuotaConfig,
    RateLimitConfig,
    RedisConfig,
    RouteCacheConfig,
    RouteConfig,
)
from resilient_ambassador.stages.breaker import BreakerStage
from tests.faults.report import FaultReport
from tests.stores.redis_server import RedisServer
from tests.support.client import ClientResponse, http_request
from tests.support.daemon import NO_RETRY, RunningDaemon, simple_config, start_daemon, upstream_config
from tests.support.upstream import Received, Reply, start_fake_upstream

# The daemons' `redis.timeout` (one Redis call's budget). Below the 0.25 s default so the
# windows, and the whole matrix, stay short; the bound scales with it.
BUDGET_S = 0.15
# Wall-clock slack on top of the Redis cost: loopback HTTP through two in-process daemons and a
# fake upstream, plus redis-py's worker-thread hops, on a shared 2-core machine where other test
# runs compete for the CPU. The breaker and quota cases, whose requests never touch Redis, see
# 20-200 ms at worst under a load average of 9; a hiccup of a few hundred ms is plausible, one
# of a whole pause or freeze (2 s, over twice the largest bound) is not, so a request that
# waited on Redis would still be caught (checked by lifting the budget and socket timeouts).
MARGIN_S = 0.6
# Healing to sharing again: the runner's 1 s cool-down, a redis-py reconnect, the quota sync's
# 0.5 s poll; generous for the same busy-machine reason.
RECOVERY_S = 6.0
WORKERS_PER_DAEMON = 2
HOST = [("host", "app.local")]  # every pod's app calls its sidecar by the same name


# -- faults -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    window_s: float  # traffic runs this long under the fault
    inject: Callable[[RedisServer], None]
    heal: Callable[[RedisServer], None]
    up_at_start: bool = True


def _pause(server: RedisServer) -> None:
    # CLIENT UNPAUSE is itself paused by `ALL`, so the pause is as long as the window and
    # expires by itself.
    server.command("CLIENT", "PAUSE", str(int(PAUSE_S * 1000)), "ALL")


def _wait_answering(server: RedisServer) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            if server.command("PING").startswith(b"+PONG"):
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "redis did not answer again"
        time.sleep(0.02)


def _oom(server: RedisServer) -> None:
    server.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    server.command("CONFIG", "SET", "maxmemory", "1")  # every write is refused with OOM


def _enough_memory(server: RedisServer) -> None:
    server.command("CONFIG", "SET", "maxmemory", "0")


def _restart(server: RedisServer) -> None:
    server.start()  # same port: a Redis restarted without persistence


def _nothing(server: RedisServer) -> None:
    return None


# CLIENT PAUSE in the issue is 5000 ms; 2 s keeps the matrix short and is still over twice the
# largest bound, so a request that waited out the pause fails the case.
PAUSE_S = 2.0

FAULTS = [
    Fault("down_at_start", 1.0, _nothing, _restart, up_at_start=False),
    Fault("kill_restart", 1.5, lambda s: s.kill(), _restart),
    Fault("client_pause", PAUSE_S, _pause, _wait_answering),
    Fault("sigstop", 2.0, lambda s: s.freeze(), lambda s: s.thaw()),
    Fault("oom", 1.0, _oom, _enough_memory),
]


# -- features ---------------------------------------------------------------------------------


class Feature(Protocol):
    name: ClassVar[str]
    # Sequential Redis calls one request may wait on, each within BUDGET_S.
    redis_calls_per_request: ClassVar[int]

    def config(self, upstream_url: str, redis: RedisConfig) -> Config: ...
    def reply(self, received: Received) -> Reply: ...
    def target(self) -> tuple[str, list[tuple[str, str]]]: ...
    async def before_fault(self, a: RunningDaemon, b: RunningDaemon) -> None: ...
    async def during_fault(self, a: RunningDaemon, b: RunningDaemon) -> None: ...
    def fault_seen(self, a: RunningDaemon, b: RunningDaemon) -> bool: ...
    async def shared_again(self, a: RunningDaemon, b: RunningDaemon) -> bool: ...
    async def after_recovery(self, a: RunningDaemon, b: RunningDaemon) -> list[float]: ...


def _route(**fields: object) -> RouteConfig:
    return RouteConfig(upstream="up", name="api", retry=NO_RETRY, **fields)  # type: ignore[arg-type]


def _unique() -> str:
    return secrets.token_hex(6)


async def _get(
    daemon: RunningDaemon, target: str, headers: list[tuple[str, str]] | None = None
) -> ClientResponse:
    return await http_request(daemon.port, "GET", target, [*HOST, *(headers or [])])


# Slow refill: nothing comes back during a case, so "B refuses after A spent the burst" is exact.
TENANT_LIMIT = RateLimitConfig(
    count=3, period_s=60.0, burst=3, key="header", key_header="x-tenant", backend="redis"
)


@dataclass
class RateLimit:
    """A Redis-backed limit keyed by a header: unique tenants during the fault (always admitted,
    whichever backend decides), one shared tenant to prove the buckets are shared again."""

    name: ClassVar[str] = "rate_limit"
    # A batch leader's round trip, then its own if it queued behind one.
    redis_calls_per_request: ClassVar[int] = 2
    limit: RateLimitConfig = field(default_factory=lambda: TENANT_LIMIT)

    def config(self, upstream_url: str, redis: RedisConfig) -> Config:
        assert self.limit.on_backend_failure == "local"  # the documented default under test
        up = upstream_config(upstream_url)
        return dataclasses.replace(simple_config(up, routes=[_route(rate_limit=self.limit)]), redis=redis)

    def reply(self, received: Received) -> Reply:
        return Reply()

    def target(self) -> tuple[str, list[tuple[str, str]]]:
        return "/api", [("x-tenant", _unique())]

    async def before_fault(self, a: RunningDaemon, b: RunningDaemon) -> None:
        return None

    async def during_fault(self, a: RunningDaemon, b: RunningDaemon) -> None:
        return None

    def fault_seen(self, a: RunningDaemon, b: RunningDaemon) -> bool:
        return any(_route_stats(d)["backend_fallbacks"] > 0 for d in (a, b))

    async def shared_again(self, a: RunningDaemon, b: RunningDaemon) -> bool:
        tenant = [("x-tenant", _unique())]
        assert [(await _get(a, "/api", tenant)).status for _ in range(3)] == [200] * 3
        refused = await _get(b, "/api", tenant)
        assert refused.status in (200, 429)
        return refused.status == 429  # B saw A's three tokens: one bucket again

    async def after_recovery(self, a: RunningDaemon, b: RunningDaemon) -> list[float]:
        return await _timed([(d, *self.target()) for d in (a, b) for _ in range(5)])


async def _timed(requests: list[tuple[RunningDaemon, str, list[tuple[str, str]]]]) -> list[float]:
    """The requests, 8 at a time, each asserted 200; their wall-clock latencies."""
    latencies_s: list[float] = []
    pending = list(requests)

    async def client() -> None:
        while pending:
            daemon, target, headers = pending.pop()
            started = trio.current_time()
            response = await _get(daemon, target, headers)
            latencies_s.append(trio.current_time() - started)
            assert response.status == 200, (target, response.status, response.body[:100])

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(client)
    return latencies_s


def _route_stats(daemon: RunningDaemon) -> dict[str, int]:
    stats = daemon.app.stats()["rate_limits"]
    assert isinstance(stats, dict)
    routes = stats["routes"]
    assert isinstance(routes, dict)
    route = routes["api"]
    assert isinstance(route, dict)
    return {k: v for k, v in route.items() if isinstance(v, int)}


@dataclass
class Cache:
    """The Redis response store: unique misses (read + coalescing lease), one hot URL asked by
    both pods at once (the lease across pods), and a URL A cached before the fault (its
    near-cache copy answers while Redis cannot). Writes are write-behind throughout."""

    name: ClassVar[str] = "cache"
    # A miss reads the entry, then takes the lease; writes are in the background.
    redis_calls_per_request: ClassVar[int] = 2
    hot: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    warmed: bool = False

    def config(self, upstream_url: str, redis: RedisConfig) -> Config:
        route = _route(cache=RouteCacheConfig(enabled=True))
        config = simple_config(upstream_config(upstream_url), routes=[route])
        return dataclasses.replace(config, redis=redis, cache=CacheStoreConfig(backend="redis"))

    def reply(self, received: Received) -> Reply:
        return Reply(headers=(("cache-control", "max-age=60"),), body=received.target)

    def target(self) -> tuple[str, list[tuple[str, str]]]:
        if not self.hot or secrets.randbelow(3) == 0:
            self.hot.append(f"/hot/{_unique()}")  # a new hot URL every few requests
        target = self.hot[-1] if secrets.randbelow(2) else f"/miss/{_unique()}"
        self.asked.append(target)
        return target, []

    async def before_fault(self, a: RunningDaemon, b: RunningDaemon) -> None:
        assert (await _get(a, "/warm")).status == 200
        self.warmed = True
        await trio.sleep(1.1)  # past the near-cache TTL: A asks Redis for it again

    async def during_fault(self, a: RunningDaemon, b: RunningDaemon) -> None:
        if self.warmed:  # over a second later: past the near-cache TTL, so Redis was asked first
            warm = await _get(a, "/warm")
            assert (warm.status, warm.body) == (200, b"/warm")
            assert (warm.header("cache-status") or "").startswith("resilient-ambassador; hit")

    def fault_seen(self, a: RunningDaemon, b: RunningDaemon) -> bool:
        return any(
            d.app.cache_store is not None
            and d.app.cache_store.stats.redis_fallbacks + d.app.cache_store.stats.dropped_writes > 0
            for d in (a, b)
        )

    async def shared_again(self, a: RunningDaemon, b: RunningDaemon) -> bool:
        target = f"/after/{_unique()}"
        assert (await _get(a, target)).status == 200
        with trio.move_on_after(1.0):  # A's write-behind lands, then B reads it from Redis
            while True:
                seen = await _get(b, target)
                assert (seen.status, seen.body) == (200, target.encode())
                if (seen.header("cache-status") or "").startswith("resilient-ambassador; hit"):
                    return True
                target = f"/after/{_unique()}"  # B's miss stored its own copy: a new URL
                assert (await _get(a, target)).status == 200
                await trio.sleep(0.05)
        return False

    async def after_recovery(self, a: RunningDaemon, b: RunningDaemon) -> list[float]:
        """Every URL asked during the fault, on both pods: no lease or entry left behind by
        the fault may hold a request up (a Redis that thawed may still run what it was sent)."""
        targets = sorted(set(self.asked))  # a stuck lease would hold both pods: one each is enough
        return await _timed([((a, b)[i % 2], target, []) for i, target in enumerate(targets)])


@dataclass
class Quota:
    """Upstream-quota awareness shared through Redis: traffic flows during the fault, then the
    upstream answers A 429 Retry-After while Redis is still faulty; once Redis is back, B holds
    its traffic too (A's pause was kept and published late)."""

    name: ClassVar[str] = "quota"
    redis_calls_per_request: ClassVar[int] = 0  # the sync runs in the background

    def config(self, upstream_url: str, redis: RedisConfig) -> Config:
        quota = QuotaConfig(enabled=True, mode="reject", shared="redis")
        return dataclasses.replace(simple_config(upstream_config(upstream_url, quota=quota)), redis=redis)

    def reply(self, received: Received) -> Reply:
        if received.target.startswith(b"/quota"):
            return Reply(status=429, headers=(("retry-after", "60"),), body=b"slow down")
        return Reply()

    def target(self) -> tuple[str, list[tuple[str, str]]]:
        return f"/api/{_unique()}", []

    async def before_fault(self, a: RunningDaemon, b: RunningDaemon) -> None:
        return None

    async def during_fault(self, a: RunningDaemon, b: RunningDaemon) -> None:
        assert (await _get(a, "/quota")).status == 429  # the upstream's own answer
        await trio.sleep(0.3)  # A's sync tries (and fails) to publish the pause meanwhile

    def fault_seen(self, a: RunningDaemon, b: RunningDaemon) -> bool:
        return any(d.app.quota_sync is not None and d.app.quota_sync.sync_errors > 0 for d in (a, b))

    async def shared_again(self, a: RunningDaemon, b: RunningDaemon) -> bool:
        if b.app.quotas["up"].state.paused_for(trio.current_time()) <= 0:
            return False
        held = await _get(b, "/api/held")
        assert held.status == 429
        assert held.header("x-ambassador-error") == "upstream_quota_exhausted"
        return True

    async def after_recovery(self, a: RunningDaemon, b: RunningDaemon) -> list[float]:
        return []  # both pods now hold the upstream's traffic: shared_again asked B


@dataclass
class Breaker:
    """Shared circuit breakers: traffic flows during the fault, then A's breaker opens on the
    upstream's 503s while Redis is still faulty; once Redis is back, B opens too."""

    name: ClassVar[str] = "breaker"
    redis_calls_per_request: ClassVar[int] = 0  # the sync runs in the background

    def config(self, upstream_url: str, redis: RedisConfig) -> Config:
        breaker = BreakerConfig(
            failure_threshold=3, min_requests=0, reset_timeout_s=30.0, shared="redis", sync_interval_s=0.1
        )
        up = upstream_config(upstream_url, breaker=breaker)
        return dataclasses.replace(simple_config(up), redis=redis)

    def reply(self, received: Received) -> Reply:
        return Reply(status=503) if received.target.startswith(b"/fail") else Reply()

    def target(self) -> tuple[str, list[tuple[str, str]]]:
        return f"/api/{_unique()}", []

    async def before_fault(self, a: RunningDaemon, b: RunningDaemon) -> None:
        return None

    async def during_fault(self, a: RunningDaemon, b: RunningDaemon) -> None:
        assert [(await _get(a, "/fail")).status for _ in range(3)] == [503] * 3  # the upstream's
        assert _breaker(a).state == "open"
        await trio.sleep(0.3)  # A's sync tries (and fails) to publish the open meanwhile

    def fault_seen(self, a: RunningDaemon, b: RunningDaemon) -> bool:
        return any(d.app.breaker_sync is not None and d.app.breaker_sync.sync_errors > 0 for d in (a, b))

    async def shared_again(self, a: RunningDaemon, b: RunningDaemon) -> bool:
        if _breaker(b).state != "open":
            return False
        refused = await _get(b, "/api/refused")
        assert (refused.status, refused.header("x-ambassador-error")) == (503, "circuit_open")
        return True

    async def after_recovery(self, a: RunningDaemon, b: RunningDaemon) -> list[float]:
        return []  # both breakers are now open: shared_again asked B


def _breaker(daemon: RunningDaemon) -> BreakerStage:
    stage = daemon.app.breakers["up"]
    assert isinstance(stage, BreakerStage)
    return stage


FEATURES: dict[str, Callable[[], Feature]] = {f.name: f for f in (RateLimit, Cache, Quota, Breaker)}


# -- the matrix -------------------------------------------------------------------------------


@dataclass
class Traffic:
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    # The event loop's worst lateness waking a 10 ms sleep: a stall of the whole process (a
    # Redis call on the trio thread, or the machine being busy), as opposed to one request
    # waiting on Redis.
    loop_lag_s: float = 0.0

    @property
    def worst_s(self) -> float:
        return max(self.latencies_s)


async def _drive(feature: Feature, daemons: list[RunningDaemon], window_s: float) -> Traffic:
    """Requests back to back from WORKERS_PER_DAEMON clients per daemon until the window ends."""
    traffic = Traffic()
    end = trio.current_time() + window_s

    async def client(daemon: RunningDaemon) -> None:
        while trio.current_time() < end:
            target, headers = feature.target()
            started = trio.current_time()
            response = await _get(daemon, target, headers)
            traffic.latencies_s.append(trio.current_time() - started)
            traffic.statuses[response.status] = traffic.statuses.get(response.status, 0) + 1
            if response.status != 200:
                traffic.bad.append(f"{target} -> {response.status} {response.body[:100]!r}")

    async def lag() -> None:
        while trio.current_time() < end:
            asleep = trio.current_time()
            await trio.sleep(0.01)
            traffic.loop_lag_s = max(traffic.loop_lag_s, trio.current_time() - asleep - 0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag)
        for daemon in daemons:
            for _ in range(WORKERS_PER_DAEMON):
                nursery.start_soon(client, daemon)
    return traffic


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = RedisServer()  # a free port, started (or not) by the case
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
@pytest.mark.parametrize("feature_name", FEATURES)
async def test_redis_fault(
    feature_name: str,
    fault: Fault,
    server: RedisServer,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    fault_report: FaultReport,
) -> None:
    feature = FEATURES[feature_name]()
    if fault.up_at_start:
        server.start()
    upstream = await start_fake_upstream(nursery, default=feature.reply)
    redis = RedisConfig(url=server.url, timeout_s=BUDGET_S, key_prefix=f"faults-{_unique()}:")
    config = feature.config(upstream.url(), redis)
    a = await start_daemon(nursery, config)
    b = await start_daemon(nursery, config)
    if fault.up_at_start:
        await feature.before_fault(a, b)

    # In a thread, like the heal: the daemons keep serving on this event loop meanwhile.
    await trio.to_thread.run_sync(fault.inject, server)
    traffic = await _drive(feature, [a, b], fault.window_s)
    await feature.during_fault(a, b)
    ready = [(await http_request(d.admin_port, "GET", "/readyz")).status for d in (a, b)]
    fault_seen = feature.fault_seen(a, b)
    await trio.to_thread.run_sync(fault.heal, server)  # the pause: until it has expired

    healed = trio.current_time()
    shared = False
    with trio.move_on_after(RECOVERY_S):
        while not (shared := await feature.shared_again(a, b)):  # noqa: ASYNC110 (state in Redis)
            await trio.sleep(0.05)
    recovery_s = trio.current_time() - healed
    after_s = await feature.after_recovery(a, b) if shared else []
    fault_report.record(
        feature.name,
        fault.name,
        traffic.worst_s,
        recovery_s,
        len(traffic.latencies_s),
        max(after_s, default=0.0),
        traffic.loop_lag_s,
    )

    bound_s = feature.redis_calls_per_request * BUDGET_S + MARGIN_S
    assert traffic.bad == [], f"non-200 answers while Redis was faulty: {traffic.bad[:5]}"
    assert traffic.worst_s <= bound_s, f"worst latency {traffic.worst_s:.3f}s over {bound_s:.2f}s"
    assert len(traffic.latencies_s) >= 4 * WORKERS_PER_DAEMON  # traffic did flow
    assert fault_seen, "the fault never reached the feature: the case proves nothing"
    assert ready == [200, 200]
    assert shared, f"{feature.name} not shared again within {RECOVERY_S}s of Redis healing"
    assert max(after_s, default=0.0) <= bound_s, f"after recovery: {max(after_s):.3f}s over {bound_s:.2f}s"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    # Logged once per daemon when Redis goes away (and maybe once more if it flapped while
    # healing), never once per call.
    gone = [
        r
        for r in caplog.records
        if r.name == "resilient_ambassador.redis" and "unavailable" in r.getMessage()
    ]
    assert len(gone) <= 4, [r.getMessage() for r in gone]
    for daemon in (a, b):
        daemon.app.stop_now()
