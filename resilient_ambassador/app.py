"""Builds the running daemon from a Config: pools, pipelines, listeners; owns the root
nursery, the signal handling and the graceful drain."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import final

import trio

from resilient_ambassador import gc_tuning, telemetry
from resilient_ambassador.config_loader import ConfigError
from resilient_ambassador.core.config import Config, ListenerConfig, RouteConfig, UpstreamConfig
from resilient_ambassador.core.messages import Handler
from resilient_ambassador.core.redact import Json, config_document
from resilient_ambassador.core.retry import RetryBudget
from resilient_ambassador.net.access_log import AccessLog
from resilient_ambassador.net.admin import AdminServer, Readiness
from resilient_ambassador.net.listen import open_listeners
from resilient_ambassador.net.relay import RelayServer
from resilient_ambassador.net.resolver import Resolver
from resilient_ambassador.net.server import HttpServer, RouteRuntime
from resilient_ambassador.net.upstream import ConnectionPool, UpstreamClient
from resilient_ambassador.secrets import SecretResolver
from resilient_ambassador.stages.breaker import BreakerChange, BreakerStage, maybe_breaker
from resilient_ambassador.stages.cache import CacheStage, CacheStats
from resilient_ambassador.stages.ratelimit import QuotaStage, QuotaTracker, RateLimitStage
from resilient_ambassador.stages.retry import RetryStage
from resilient_ambassador.stages.telemetry import AttemptTelemetry, RequestTelemetry
from resilient_ambassador.stores.cache_memory import CacheStore, MemoryCacheStore
from resilient_ambassador.stores.cache_redis import RedisCacheStore
from resilient_ambassador.stores.errors import StoreUnavailable
from resilient_ambassador.stores.ratelimit import Buckets, MemoryBuckets, RedisBuckets
from resilient_ambassador.stores.redis_client import RedisRunner
from resilient_ambassador.stores.shared_breaker import SharedBreakerSync
from resilient_ambassador.stores.shared_quota import SharedQuotaSync
from resilient_ambassador.telemetry import Telemetry

log = logging.getLogger("resilient_ambassador")

# How often idle pooled connections are checked for expiry or a peer close.
POOL_SWEEP_INTERVAL_S = 5.0
LISTEN_BACKLOG = 4096
ORPHAN_CHECK_INTERVAL_S = 1.0


def upstream_host(config: UpstreamConfig) -> bytes:
    return (config.host_header or config.url.authority).encode()


def build_pipeline(
    route: RouteConfig,
    upstream: Handler,
    telemetry: Telemetry | None = None,
    rate_limit: Callable[[Handler], Handler] | None = None,
    cache: Callable[[Handler], Handler] | None = None,
) -> Handler:
    """A route's chain of stages, outermost first: telemetry -> cache -> retry -> rate limit ->
    quota -> breaker -> attempt telemetry -> upstream client. (`upstream` may already carry
    the upstream's quota stage in front of its breaker; `rate_limit` and `cache` wrap the
    handler in the route's RateLimitStage and CacheStage.)

    `upstream` is the upstream's shared breaker (or its client when the breaker is off): one
    breaker per upstream, whatever the number of routes. Retry sits outside it, so every
    attempt passes the breaker and an open breaker is never retried. Cache and rate limit
    slot in here as they land (cache outermost: a hit spends no quota; rate limit between
    retry and breaker: every attempt takes a token)."""
    handler = upstream if rate_limit is None else rate_limit(upstream)
    # The retry stage also owns the route deadline and the client deadline header.
    if route.retry.retries > 0 or route.timeout_s is not None or route.deadline_header is not None:
        handler = RetryStage(
            handler,
            route.retry,
            route_timeout_s=route.timeout_s,
            deadline_header=route.deadline_header.encode() if route.deadline_header else None,
            budget=RetryBudget.from_config(route.retry),
            upstream=route.upstream,
        )
    if cache is not None:
        handler = cache(handler)  # a hit spends no retry budget and no quota
    if telemetry is not None:
        handler = RequestTelemetry(handler, telemetry, route)
    return handler


class ReloadError(Exception):
    """A reload that could not be applied; the running config keeps serving."""


@final
@dataclass
class BoundListeners:
    """Sockets bound before serving: one list per data listener, and the admin listener's."""

    data: list[list[trio.SocketListener]]
    admin: list[trio.SocketListener] = field(default_factory=list)
    relay: list[list[trio.SocketListener]] = field(default_factory=list)  # one per tcp listener

    def close(self) -> None:
        for listeners in (*self.data, self.admin, *self.relay):
            for listener in listeners:
                listener.socket.close()


@final
class App:
    def __init__(
        self,
        config: Config,
        secrets: SecretResolver | None = None,
        *,
        worker: int | None = None,
        telemetry: Telemetry | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        # One DNS cache for every upstream pool and relay (tests inject a lookup function).
        self.resolver = resolver or Resolver(config.dns)
        # Set when this process is worker N of `--workers`: listeners bind with SO_REUSEPORT.
        self.worker = worker
        self.secrets = secrets or SecretResolver()
        self.telemetry = telemetry or Telemetry(config.telemetry)
        self.pools: dict[str, ConnectionPool] = {}
        self.clients: dict[str, UpstreamClient] = {}
        self.breakers: dict[str, Handler] = {}
        self._build_upstreams(config, keep=None)
        # Shared breaker state: an open breaker here opens it on every daemon using this Redis.
        # One Redis runner (creating it does no I/O) for every kind of shared state, so a dead
        # Redis trips one breaker and costs one budget, whichever policy noticed first.
        self.redis: RedisRunner | None = None
        if config.redis.url is not None:
            self.redis = RedisRunner.from_url(
                config.redis.url, timeout_s=config.redis.timeout_s, tls=config.redis.tls
            )
        self.breaker_sync: SharedBreakerSync | None = None
        shared = [
            stage
            for stage in self.breakers.values()
            if isinstance(stage, BreakerStage) and stage.config.shared == "redis"
        ]
        if shared and self.redis is not None:
            self.breaker_sync = SharedBreakerSync(self.redis, key_prefix=config.redis.key_prefix)
            for stage in shared:
                self.breaker_sync.register(stage)
        # The response cache: one store for every route that turns it on (docs/cache.md).
        self.cache_stats = CacheStats()
        self.cache_stages: list[CacheStage] = []
        self.cache_store: CacheStore | None = None
        if any(route.cache.enabled for listener in config.listeners for route in listener.routes):
            self.cache_store = self._make_cache_store()
        # Upstream-quota awareness: one tracker per upstream, in front of its breaker(s).
        self.quotas: dict[str, QuotaTracker] = {}
        self.quota_sync: SharedQuotaSync | None = None
        if self.redis is not None and any(
            up.quota.enabled and up.quota.shared == "redis" for up in config.upstreams.values()
        ):
            self.quota_sync = SharedQuotaSync(self.redis, key_prefix=config.redis.key_prefix)
        self._build_quotas(config, keep=None)
        # Rate limits: one stage per route with a `rate_limit`; memory buckets are shared by
        # the routes of this process (a `key: upstream` bucket spans routes) and kept across
        # reloads.
        self.rate_limits: dict[str, RateLimitStage] = {}
        self._redis_buckets: dict[str, RedisBuckets] = {}
        self._memory_buckets = MemoryBuckets()
        self.servers: list[HttpServer] = [
            HttpServer(listener, self._route_table(listener, config))
            for listener in config.listeners
            if listener.protocol != "tcp"
        ]
        # protocol: tcp listeners (relays); a reload leaves them as they are.
        self.relays: list[RelayServer] = [
            RelayServer(listener, self.resolver)
            for listener in config.listeners
            if listener.protocol == "tcp"
        ]
        self.access_log = (
            AccessLog(config.access_log, self.secrets.secret_values) if config.access_log.enabled else None
        )
        for server in self.servers:
            server.access_log = self.access_log
        self._observe()
        self.admin = (
            AdminServer(
                readiness=self.readiness,
                stats=self.stats,
                config=self.config_document,
                metrics=self.telemetry.prometheus_text,
                purge=self.purge_cache if self.cache_store is not None else None,
            )
            if config.admin.enabled
            else None
        )
        self.admin_addresses: list[tuple[str, int]] = []
        self._accepting: trio.CancelScope | None = None
        # Set while serving, for reloads: where accept loops and connections run, each
        # server's accept scope (to stop one listener), and every bound socket (to close).
        self._accept_nursery: trio.Nursery | None = None
        self._connection_nursery: trio.Nursery | None = None
        self._accept_scopes: dict[int, trio.CancelScope] = {}
        self._bound_ports: dict[str, int] = {}  # listener name -> the port it got (port 0)
        self._bound: BoundListeners | None = None
        self._reload_lock = trio.Lock()
        self._background: trio.Nursery | None = None
        self._cache_scopes: dict[int, trio.CancelScope] = {}
        self.reloads = 0
        self.reload_failures = 0
        self._connections: trio.CancelScope | None = None
        self._serving = False
        self._started_at: float | None = None
        self.draining = False
        self.unready = False  # SIGTERM seen: /readyz says 503 while the drain delay runs

    def _observe(self) -> None:
        """Metrics read from the counters the daemon keeps anyway (no cost per request)."""
        t = self.telemetry
        states = {"closed": 0, "half-open": 1, "open": 2}
        t.observe(
            telemetry.BREAKER_STATE,
            "gauge",
            "1",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            lambda: [
                (states.get(s.state, 2), {"ambassador.breaker": n})
                for n, s in self.breakers.items()
                if isinstance(s, BreakerStage)
            ],
        )
        t.observe(
            telemetry.OPEN_CONNECTIONS,
            "updown",
            "{connection}",
            "Open downstream connections",
            lambda: [(s.open_connections, {"ambassador.listener": s.config.name}) for s in self.servers],
        )
        t.observe(
            telemetry.LISTENER_RESPONSES,
            "counter",
            "{response}",
            "Responses by status class, including requests refused before routing",
            lambda: [
                (
                    s.responses[n],
                    {"ambassador.listener": s.config.name, "http.response.status_class": f"{n}xx"},
                )
                for s in self.servers
                for n in range(1, 6)
            ],
        )
        if self.redis is not None:
            redis = self.redis
            for name, attr, what in (
                (telemetry.REDIS_CALLS, "calls", "Redis calls"),
                (telemetry.REDIS_FAILURES, "failures", "Redis calls that failed or ran out of budget"),
                (telemetry.REDIS_SKIPPED, "skipped", "Redis calls skipped while it was unavailable"),
            ):
                t.observe(name, "counter", "{call}", what, partial(_redis_counter, redis, attr))
        t.observe(
            telemetry.CACHE_EVENTS,
            "counter",
            "{event}",
            "Cache events: stored, evicted, stale served, revalidated, collapsed, dropped writes, ...",
            self._cache_events,
        )
        t.observe(
            telemetry.CACHE_STORE_BYTES,
            "updown",
            "By",
            "Bytes this process holds in the cache store (the near-cache with Redis)",
            lambda: [] if self.cache_store is None else [(self.cache_store.stats.bytes, {})],
        )
        t.observe(
            telemetry.CACHE_STORE_ENTRIES,
            "updown",
            "{entry}",
            "Entries this process holds in the cache store",
            lambda: [] if self.cache_store is None else [(self.cache_store.stats.entries, {})],
        )
        t.observe(
            telemetry.RATE_LIMIT_FALLBACKS,
            "counter",
            "{decision}",
            "Rate-limit decisions made without Redis (on_backend_failure applied)",
            lambda: [(b.fallbacks, {"ambassador.route": name}) for name, b in self._redis_buckets.items()],
        )
        if self.access_log is not None:
            access_log = self.access_log
            t.observe(
                telemetry.ACCESS_LOG_DROPPED,
                "counter",
                "{line}",
                "Access log lines dropped because the output was blocked",
                lambda: [(access_log.dropped, {})],
            )

    def _cache_events(self) -> list[tuple[float, telemetry.Attributes]]:
        if self.cache_store is None:
            return []
        stats, store = self.cache_stats, self.cache_store.stats
        events = {
            "stored": store.stores,
            "evicted": store.evictions,
            "too_large": store.too_large,
            "dropped_write": store.dropped_writes,
            "redis_fallback": store.redis_fallbacks,
            "stale_served": stats.stale_served,
            "revalidated": stats.revalidated,
            "collapsed": stats.collapsed,
            "not_stored": stats.not_stored,
            "invalidated": stats.invalidations,
        }
        return [(count, {"ambassador.cache.event": event}) for event, count in events.items()]

    def _upstream_handler(self, route: RouteConfig) -> Handler:
        """The route's breaker, behind the upstream's quota stage when quota awareness is on."""
        handler = self.breakers[self.breaker_name(route)]
        tracker = self.quotas.get(route.upstream)
        return handler if tracker is None else QuotaStage(handler, tracker)

    def _rate_limiter(self, route: RouteConfig) -> Callable[[Handler], Handler] | None:
        limit = route.rate_limit
        if limit is None:
            return None
        buckets: Buckets = self._memory_buckets
        workers = self.config.workers
        if limit.backend == "memory" and workers > 1:
            # Each worker holds its own buckets: give each its share, so N workers together
            # admit the configured rate (exact only if the kernel spreads clients evenly; the
            # Redis backend is exact).
            limit = dataclasses.replace(
                limit, count=limit.count / workers, burst=max(1, math.ceil(limit.burst / workers))
            )
        if limit.backend == "redis":
            if self.redis is None:
                log.warning(
                    "route %s: rate_limit backend is redis but no redis.url is set: memory", route.name
                )
            else:
                redis_buckets = RedisBuckets(
                    self.redis,
                    key_prefix=self.config.redis.key_prefix,
                    on_failure=limit.on_backend_failure,
                    local_share=1.0 / (limit.expected_replicas * workers),
                    fallback=self._memory_buckets,
                    lease=limit.lease,
                )
                self._redis_buckets[route.name] = redis_buckets
                buckets = redis_buckets
        client = self.clients[route.upstream]

        def wrap(inner: Handler) -> Handler:
            stage = RateLimitStage(
                inner,
                limit,
                buckets,
                route=route.name,
                upstream=route.upstream,
                credential=client.credential_fingerprint,
            )
            self.rate_limits[route.name] = stage
            return stage

        return wrap

    def _make_cache_store(self) -> CacheStore:
        cache = self.config.cache
        if cache.backend == "redis" and self.redis is not None:
            return RedisCacheStore(
                self.redis,
                key_prefix=self.config.redis.key_prefix,
                near_cache_bytes=cache.near_cache_bytes,
                near_ttl_s=cache.near_cache_ttl_s,
            )
        return MemoryCacheStore(cache.max_bytes)

    def _cache_for(self, route: RouteConfig, config: Config) -> Callable[[Handler], Handler] | None:
        store = self.cache_store
        if store is None or not route.cache.enabled:
            return None
        client = self.clients[route.upstream]

        def wrap(inner: Handler) -> Handler:
            stage = CacheStage(
                inner,
                route.cache,
                store,
                route=route.name,
                authority=upstream_host(config.upstreams[route.upstream]),
                partition=client.credential_fingerprint,
                stats=self.cache_stats,
            )
            self.cache_stages.append(stage)
            return stage

        return wrap

    async def purge_cache(self, target: bytes, prefix: bool) -> tuple[int, dict[str, Json]]:
        """Admin purge of one target (path and query, as forwarded) or every target under a
        prefix; the status and document the admin listener answers with."""
        if self.cache_store is None:
            return 404, {"error": "cache_off", "message": "no route has the cache on"}
        try:
            purged = await self.cache_store.purge(target, prefix=prefix)
        except StoreUnavailable as exc:
            return 503, {"error": "store_unavailable", "message": str(exc)}
        log.info("cache purge (%s): %d entries", "prefix" if prefix else "url", purged)
        return 200, {"purged": purged}

    @staticmethod
    def breaker_name(route: RouteConfig) -> str:
        return route.upstream if route.breaker is None else f"{route.upstream}/{route.name}"

    def _build_upstreams(self, config: Config, keep: App | None) -> None:
        """Pools, clients and breakers for `config`'s upstreams. On a reload (`keep` is the
        running app) an upstream whose config did not change keeps its pool, its client and
        its breakers, state and all; others get new ones."""
        pools: dict[str, ConnectionPool] = {}
        clients: dict[str, UpstreamClient] = {}
        breakers: dict[str, Handler] = {}
        attempts: dict[str, Handler] = {}
        for name, up in config.upstreams.items():
            if keep is not None and keep.config.upstreams.get(name) == up:
                pools[name], clients[name], breakers[name] = (
                    keep.pools[name],
                    keep.clients[name],
                    keep.breakers[name],
                )
                continue
            pools[name] = ConnectionPool(up, self.resolver)
            clients[name] = UpstreamClient(up, pools[name], self.secrets)
            # Each attempt gets its CLIENT span inside the breaker: a refused call makes none.
            attempts[name] = AttemptTelemetry(clients[name], self.telemetry, up)
            # One breaker per upstream, shared by its routes.
            breakers[name] = self._counted(maybe_breaker(attempts[name], up.breaker, name), name)
        # A route with a `breaker` of its own gets its own (named upstream/route) around the
        # same client.
        old_routes = {} if keep is None else {r.name: r for lst in keep.config.listeners for r in lst.routes}
        for listener in config.listeners:
            for route in listener.routes:
                if route.breaker is None:
                    continue
                name = self.breaker_name(route)
                before = old_routes.get(route.name)
                if (
                    keep is not None
                    and route.upstream not in attempts
                    and before is not None
                    and (before.upstream, before.breaker) == (route.upstream, route.breaker)
                ):
                    breakers[name] = keep.breakers[name]
                    continue
                inner = attempts.get(route.upstream) or AttemptTelemetry(
                    clients[route.upstream], self.telemetry, config.upstreams[route.upstream]
                )
                breakers[name] = self._counted(maybe_breaker(inner, route.breaker, name), name)
        self.pools, self.clients, self.breakers = pools, clients, breakers

    def _build_quotas(self, config: Config, keep: App | None) -> None:
        """Quota trackers; an unchanged upstream keeps its tracker (a pause in force stays)."""
        quotas: dict[str, QuotaTracker] = {}
        for name, up in config.upstreams.items():
            if not up.quota.enabled:
                continue
            if keep is not None and name in keep.quotas and keep.config.upstreams.get(name) == up:
                quotas[name] = keep.quotas[name]
                continue
            quotas[name] = QuotaTracker(name, up.quota)
            if up.quota.shared == "redis":
                if self.quota_sync is not None:
                    self.quota_sync.register(quotas[name])
                else:
                    log.warning("upstream %s: quota.shared: redis takes effect at the next restart", name)
        self.quotas = quotas

    def _start_cache_stage(self, stage: CacheStage) -> None:
        """Run a cache stage's background refreshes (stale-while-revalidate) in a scope of its
        own, so a reload can retire the stages it replaced."""
        if self._background is None:
            return
        scope = trio.CancelScope()
        self._cache_scopes[id(stage)] = scope

        async def run() -> None:
            with scope:
                await stage.run()

        self._background.start_soon(run)

    def _counted(self, handler: Handler, name: str) -> Handler:
        if isinstance(handler, BreakerStage):
            handler.add_change_hook(partial(_count_transition, self.telemetry, name))
        return handler

    def _route_table(self, listener: ListenerConfig, config: Config) -> dict[int, RouteRuntime]:
        return {
            id(route): RouteRuntime(
                config=route,
                handler=build_pipeline(
                    route,
                    self._upstream_handler(route),
                    self.telemetry,
                    self._rate_limiter(route),
                    self._cache_for(route, config),
                ),
                upstream_host=upstream_host(config.upstreams[route.upstream]),
            )
            for route in listener.routes
        }

    async def bind(self) -> BoundListeners:
        """Bind every listener and the admin listener, all or nothing (a port in use fails
        the whole start)."""
        bound = BoundListeners([])
        try:
            for server in self.servers:
                bound.data.append(
                    await open_listeners(
                        server.config.host,
                        server.config.port,
                        backlog=LISTEN_BACKLOG,
                        reuse_port=self.worker is not None,
                    )
                )
            for relay in self.relays:
                bound.relay.append(
                    await open_listeners(
                        relay.config.host,
                        relay.config.port,
                        backlog=LISTEN_BACKLOG,
                        reuse_port=self.worker is not None,
                    )
                )
            if self.admin is not None:
                admin = self.config.admin
                # Workers share the admin port too: probes reach whichever worker the kernel
                # picks, and every worker answers for the whole process group's health.
                bound.admin = await open_listeners(
                    admin.host, admin.port, backlog=128, reuse_port=self.worker is not None
                )
        except BaseException:
            bound.close()
            raise
        return bound

    async def serve(
        self,
        bound: BoundListeners | None = None,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on the bound listeners (binding them if not given), report the addresses
        (HTTP listeners' first, then tcp listeners'), serve until `drain()`; then wait for
        in-flight requests and open tunnels up to the grace period."""
        if bound is None:
            bound = await self.bind()
        addresses: list[tuple[str, int]] = [
            listener.socket.getsockname()[:2]
            for listeners in (*bound.data, *bound.relay)
            for listener in listeners
        ]
        self.admin_addresses = [listener.socket.getsockname()[:2] for listener in bound.admin]
        self._started_at = trio.current_time()
        self._bound = bound
        try:
            # The admin listener runs in the background nursery, which outlives the data
            # connections: /readyz keeps answering 503 through the whole drain, and the admin
            # listener closes last.
            async with trio.open_nursery() as background:
                await background.start(self.resolver.run)
                if self.redis is not None:  # make the client (a Cluster's slot map) off the request path
                    background.start_soon(self.redis.connect)
                if self.access_log is not None:
                    await background.start(self.access_log.run)
                if self.breaker_sync is not None:
                    await background.start(self.breaker_sync.run)
                if self.quota_sync is not None:
                    await background.start(self.quota_sync.run)
                if self.cache_store is not None:
                    await background.start(self.cache_store.run)
                self._background = background
                for stage in self.cache_stages:
                    self._start_cache_stage(stage)
                if self.admin is not None and bound.admin:
                    background.start_soon(trio.serve_listeners, self.admin.handle_connection, bound.admin)
                    log.info("admin listener on %s", ", ".join(_address(lst) for lst in bound.admin))
                await self._serve_connections(bound.data, addresses, task_status, bound.relay)
                background.cancel_scope.cancel()
        finally:
            self._serving = False
            for pool in self.pools.values():
                pool.close_idle()
            bound.close()
            if self.access_log is not None:
                await self.access_log.aclose()
            if self.redis is not None:
                with trio.CancelScope(shield=True):
                    await self.redis.aclose()
            with trio.CancelScope(shield=True), trio.move_on_after(3.0):
                # Flushes the span and metric exporters (blocking: off the event loop).
                await trio.to_thread.run_sync(self.telemetry.shutdown, abandon_on_cancel=True)

    async def _serve_connections(
        self,
        bound: list[list[trio.SocketListener]],
        addresses: list[tuple[str, int]],
        task_status: trio.TaskStatus[list[tuple[str, int]]],
        relay_bound: Sequence[list[trio.SocketListener]] = (),
    ) -> None:
        with trio.CancelScope() as connections:
            self._connections = connections
            async with trio.open_nursery() as connection_nursery, trio.open_nursery() as accept_nursery:
                self._accepting = accept_nursery.cancel_scope
                self._accept_nursery, self._connection_nursery = accept_nursery, connection_nursery
                for server, listeners in zip(self.servers, bound, strict=True):
                    self._start_accepting(server, listeners)
                for relay, listeners in zip(self.relays, relay_bound, strict=True):
                    accept_nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            relay.handle_connection,
                            listeners,
                            handler_nursery=connection_nursery,
                        )
                    )
                    log.info(
                        "tcp listener %s on %s relaying to %s",
                        relay.config.name,
                        ", ".join(_address(listener) for listener in listeners),
                        ", ".join(str(url) for url in relay.relay.upstreams),
                    )
                accept_nursery.start_soon(self._sweep_pools)
                self._serving = True
                task_status.started(addresses)
            self._accept_nursery = self._connection_nursery = None
        if connections.cancelled_caught:
            log.warning("grace period over: closed the connections still open")

    def _start_accepting(self, server: HttpServer, listeners: list[trio.SocketListener]) -> None:
        """Accept on `listeners` for `server`, in a scope of its own so a reload can stop
        this one listener; its connections run in the shared connection nursery."""
        assert self._accept_nursery is not None
        assert self._connection_nursery is not None
        scope = trio.CancelScope()
        self._accept_scopes[id(server)] = scope
        self._bound_ports[server.config.name] = listeners[0].socket.getsockname()[1]
        connection_nursery = self._connection_nursery

        async def accept() -> None:
            with scope:
                await trio.serve_listeners(
                    server.handle_connection, listeners, handler_nursery=connection_nursery
                )

        self._accept_nursery.start_soon(accept)
        log.info(
            "listener %s on %s (%d routes)",
            server.config.name,
            ", ".join(_address(listener) for listener in listeners),
            len(server.config.routes),
        )

    async def reload(self, config: Config) -> None:
        """Swap in a new, already validated config without dropping a request.

        New requests use the new routes at once; requests in flight finish on the pipeline
        they started with. Upstreams whose config is unchanged keep their pools, breakers
        (and their state) and clients. Listeners are matched by name: one whose address is
        unchanged keeps its socket and takes the new routes and limits (open connections
        keep the limits they started with); a new one is bound first, so a port in use fails
        the whole reload before anything changed (ReloadError); a removed one stops
        accepting and drains its connections. Sections that only take effect at start-up
        (admin, redis, workers, access_log, telemetry) are kept as they are, with a warning."""
        async with self._reload_lock:
            try:
                await self._reload(config)
            except ReloadError as exc:
                self.reload_failed(str(exc))
                raise
            self.reloads += 1
            self.telemetry.reloads.add(1, {"result": "success"})

    def reload_failed(self, why: str) -> None:
        """Count and log a reload that was refused (bad config, port in use, ...)."""
        self.reload_failures += 1
        self.telemetry.reloads.add(1, {"result": "failure"})
        log.error("reload failed; the running config stays: %s", why)

    async def _reload(self, config: Config) -> None:
        if self.draining or self.unready or self._accept_nursery is None:
            raise ReloadError("not serving (starting or draining)")
        fixed = ("admin", "redis", "workers", "access_log", "telemetry", "cache", "dns")
        changed = [key for key in fixed if getattr(config, key) != getattr(self.config, key)]
        if changed:
            log.warning("reload: %s changed; that takes effect at the next restart", ", ".join(changed))
            config = dataclasses.replace(config, **{key: getattr(self.config, key) for key in fixed})
        # tcp listeners (relays) are not reloaded: keep the running ones as they are.
        relays = {relay.config.name: relay.config for relay in self.relays}
        wanted = {listener.name: listener for listener in config.listeners if listener.protocol == "tcp"}
        if wanted != relays:
            log.warning("reload: tcp listeners changed; that takes effect at the next restart")
        config = dataclasses.replace(
            config,
            listeners=tuple(lst for lst in config.listeners if lst.protocol != "tcp")
            + tuple(relays.values()),
        )
        running = {server.config.name: server for server in self.servers}
        same_address = {
            listener.name
            for listener in config.listeners
            if listener.name in running
            and listener.host == running[listener.name].config.host
            and listener.port in (running[listener.name].config.port, self._bound_ports.get(listener.name))
        }
        fresh: list[tuple[ListenerConfig, list[trio.SocketListener]]] = []
        try:
            for listener in config.listeners:
                if listener.protocol != "tcp" and listener.name not in same_address:
                    sockets = await open_listeners(
                        listener.host,
                        listener.port,
                        backlog=LISTEN_BACKLOG,
                        reuse_port=self.worker is not None,
                    )
                    fresh.append((listener, sockets))
        except OSError as exc:
            for _, sockets in fresh:
                for socket in sockets:
                    socket.socket.close()
            raise ReloadError(f"cannot bind a new listener: {exc}") from exc

        # From here on nothing awaits: the swap is atomic for every connection task.
        previous_pools = self.pools
        self._build_upstreams(config, keep=self)
        self._build_quotas(config, keep=self)
        self.rate_limits, self._redis_buckets = {}, {}
        retired, self.cache_stages = self.cache_stages, []
        if self.cache_store is None and any(r.cache.enabled for lst in config.listeners for r in lst.routes):
            log.warning("reload: the cache is turned on; it takes effect at the next restart")
        shared = self.breaker_sync
        for stage in self.breakers.values():
            if isinstance(stage, BreakerStage) and stage.config.shared == "redis" and shared is not None:
                shared.register(stage)
        servers: list[HttpServer] = []
        for listener in config.listeners:
            if listener.protocol != "tcp" and listener.name in same_address:
                server = running.pop(listener.name)
                server.swap(listener, self._route_table(listener, config))
                servers.append(server)
        for listener, sockets in fresh:
            server = HttpServer(listener, self._route_table(listener, config))
            server.access_log = self.access_log
            servers.append(server)
            if self._bound is not None:
                self._bound.data.append(sockets)
            self._start_accepting(server, sockets)
        for server in running.values():  # removed, or moved to another address
            self._accept_scopes.pop(id(server), trio.CancelScope()).cancel()
            server.start_drain()
            log.info("listener %s removed: draining its connections", server.config.name)
        self.servers = servers
        self.config = config
        for stage in retired:  # their queued background refreshes are best-effort: dropped
            self._cache_scopes.pop(id(stage), trio.CancelScope()).cancel()
        for stage in self.cache_stages:
            self._start_cache_stage(stage)
        for name, pool in previous_pools.items():
            if self.pools.get(name) is not pool:
                pool.close_idle()  # in-flight requests finish on it; nothing new will use it
        log.info(
            "config reloaded: %d listeners, %d upstreams (%d kept as they were)",
            len(servers),
            len(config.upstreams),
            sum(1 for name, pool in self.pools.items() if previous_pools.get(name) is pool),
        )

    def readiness(self) -> Readiness:
        if self.draining or self.unready:
            return "draining"
        return "ready" if self._serving else "starting"

    def config_document(self) -> dict[str, Json]:
        """The effective config, secrets redacted (see core.redact)."""
        return config_document(self.config)

    def stats(self) -> dict[str, Json]:
        """The admin /stats document: counters since start, read without any I/O."""
        now = trio.current_time()
        listeners: dict[str, Json] = {}
        for server in self.servers:
            listeners[server.config.name] = {
                "open_connections": server.open_connections,
                "requests": server.requests,
                "responses": {f"{n}xx": server.responses[n] for n in range(1, 6)},
            }
        upstreams: dict[str, Json] = {
            name: {"in_use": pool.in_use, "idle": pool.idle_count, "opened": pool.connections_opened}
            for name, pool in self.pools.items()
        }
        breakers: dict[str, Json] = {
            name: dict(asdict(stage.stats()))
            for name, stage in self.breakers.items()
            if isinstance(stage, BreakerStage)
        }
        redis_stats: Json = None
        if self.redis is not None:
            redis = self.redis
            # The one runner every Redis store shares: its calls are the daemon's round trips.
            redis_stats = {
                "connected": redis.client is not None,  # a Cluster's client is made at start
                "healthy": redis.healthy,
                "calls": redis.calls,
                "failures": redis.failures,
                "skipped": redis.skipped,
            }
        shared: Json = None
        if self.breaker_sync is not None and self.redis is not None:
            sync = self.breaker_sync
            shared = {
                "replica_id": sync.replica_id,
                "published": sync.published,
                "cleared": sync.cleared,
                "forced_opens": sync.forced_opens,
                "sync_errors": sync.sync_errors,
                "redis": redis_stats,
            }
        tcp_listeners: dict[str, Json] = {
            relay.config.name: {
                **asdict(relay.stats),
                "breaker": dict(asdict(relay.breaker.stats())) if relay.breaker is not None else None,
            }
            for relay in self.relays
        }
        return {
            "pid": os.getpid(),
            "worker": self.worker,
            "ready": self.readiness() == "ready",
            "draining": self.draining,
            "uptime_s": round(now - self._started_at, 3) if self._started_at is not None else 0.0,
            # Every live trio task of the process: back to its baseline when idle, or tasks leak.
            "tasks": trio.lowlevel.current_statistics().tasks_living,
            "listeners": listeners,
            "upstreams": upstreams,
            "breakers": breakers,
            "shared_breaker": shared,
            "redis": redis_stats,
            "rate_limits": self._rate_limit_stats(),
            "reloads": {"succeeded": self.reloads, "failed": self.reload_failures},
            "gc": gc_tuning.stats(),
            "access_log": None
            if self.access_log is None
            else {
                "lines": self.access_log.lines,
                "dropped": self.access_log.dropped,
                "write_errors": self.access_log.write_errors,
            },
            "tcp_listeners": tcp_listeners,
            "cache": self._cache_stats(),
            "dns": {"entries": self.resolver.entries, **asdict(self.resolver.stats)},
        }

    def _rate_limit_stats(self) -> dict[str, Json]:
        routes: dict[str, Json] = {}
        for name, stage in self.rate_limits.items():
            stats = stage.stats
            redis_buckets = self._redis_buckets.get(name)
            if redis_buckets is not None:
                stats.backend_fallbacks = redis_buckets.fallbacks
                stats.backend_round_trips = redis_buckets.round_trips
                stats.backend_script_runs = redis_buckets.script_runs
                stats.backend_leased = redis_buckets.leased
            doc: dict[str, Json] = dict(asdict(stats))
            doc["queue_wait_s"] = round(stats.queue_wait_s, 6)
            routes[name] = doc
        quotas: dict[str, Json] = {}
        for name, tracker in self.quotas.items():
            doc = dict(asdict(tracker.stats))
            doc["paused_for_s"] = round(tracker.state.paused_for(trio.current_time()), 3)
            quotas[name] = doc
        shared: Json = None
        if self.quota_sync is not None:
            sync = self.quota_sync
            shared = {"published": sync.published, "applied": sync.applied, "sync_errors": sync.sync_errors}
        return {"routes": routes, "upstream_quota": quotas, "shared_quota": shared}

    def _cache_stats(self) -> Json:
        if self.cache_store is None:
            return None
        doc: dict[str, Json] = dict(asdict(self.cache_stats))
        doc["backend"] = "redis" if isinstance(self.cache_store, RedisCacheStore) else "memory"
        doc["store"] = dict(asdict(self.cache_store.stats))
        if isinstance(self.cache_store, RedisCacheStore) and self.redis is not None:
            doc["redis_healthy"] = self.redis.healthy
        return doc

    def drain(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, close idle
        keep-alive connections now."""
        if self.draining:
            return
        self.draining = True
        grace_s = self.config.drain.grace_period_s
        log.info("draining: no new connections, /readyz answers 503; in-flight requests have %gs", grace_s)
        if self._accepting is not None:
            self._accepting.cancel()
        for server in self.servers:
            server.start_drain()
        if self._connections is not None:
            self._connections.deadline = trio.current_time() + grace_s

    async def drain_after_delay(self) -> None:
        """The SIGTERM sequence: /readyz 503 at once, keep serving for `drain.delay` (so the
        endpoint's removal reaches every load balancer first), then `drain()`."""
        self.unready = True
        delay_s = self.config.drain.delay_s
        if delay_s > 0:
            log.info("/readyz answers 503; still serving for the %gs drain delay", delay_s)
            await trio.sleep(delay_s)
        self.drain()

    def stop_now(self) -> None:
        if self._connections is not None:
            self._connections.cancel()
        if self._accepting is not None:
            self._accepting.cancel()

    async def _sweep_pools(self) -> None:
        while True:
            await trio.sleep(POOL_SWEEP_INTERVAL_S)
            for pool in self.pools.values():
                pool.expire_idle()


def _count_transition(t: Telemetry, name: str, change: BreakerChange) -> None:
    t.breaker_transitions.add(1, {"ambassador.breaker": name, "ambassador.breaker.state": change.state})


def _redis_counter(redis: RedisRunner, attr: str) -> list[tuple[float, telemetry.Attributes]]:
    return [(getattr(redis, attr), {})]


def _address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run(
    config: Config,
    secrets: SecretResolver | None = None,
    *,
    worker: int | None = None,
    reload_config: Callable[[], Config] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain; a second signal stops at once. SIGHUP reloads
    (`reload_config` reads and validates the config again). Installing handlers also makes
    SIGTERM work when we are PID 1 in a container, where the kernel ignores signals that
    have no handler.

    A worker of `--workers` ignores SIGINT (a terminal's Ctrl-C reaches the whole process
    group; the supervisor forwards it as SIGTERM, once) and drains if its supervisor dies."""
    app = App(config, secrets, worker=worker)
    bound = await app.bind()  # outside the nursery: a bind error surfaces as a plain OSError
    gc_tuning.settle()  # start-up is done: what is alive now lives as long as the process
    signals = [signal.SIGTERM, signal.SIGHUP]
    if worker is None:
        signals.append(signal.SIGINT)
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with trio.open_signal_receiver(*signals) as received:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_handle_signals, app, received, reload_config)
            if worker is not None:
                nursery.start_soon(_drain_when_orphaned, app, os.getppid())
            await app.serve(bound)
            nursery.cancel_scope.cancel()


async def _drain_when_orphaned(app: App, parent_pid: int) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) would serve on unsupervised; drain."""
    while os.getppid() == parent_pid:  # noqa: ASYNC110 (no event exists for a parent's death)
        await trio.sleep(ORPHAN_CHECK_INTERVAL_S)
    log.warning("supervisor (pid %d) is gone: draining", parent_pid)
    app.drain()


async def _handle_signals(
    app: App, received: AsyncIterator[int], reload_config: Callable[[], Config] | None
) -> None:
    async with trio.open_nursery() as nursery:
        async for signum in received:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                await _reload_on_signal(app, reload_config)
            elif app.unready or app.draining:
                log.warning("second %s: stopping now", name)
                app.drain()
                app.stop_now()
            else:
                log.info("%s received", name)
                nursery.start_soon(app.drain_after_delay)


async def _reload_on_signal(app: App, reload_config: Callable[[], Config] | None) -> None:
    if reload_config is None:
        log.warning("SIGHUP: this daemon was not started with a config to reload; ignored")
        return
    log.info("SIGHUP: reloading the config")
    try:
        config = reload_config()
    except ConfigError as exc:
        app.reload_failed(str(exc))
        return
    with contextlib.suppress(ReloadError):  # reload() logged and counted it
        await app.reload(config)
        gc_tuning.refreeze()
