"""Builds the running daemon from a Config: pools, pipelines, listeners; owns the root
nursery, the signal handling and the graceful drain."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import final

import trio

from resilient_ambassador.core.config import Config, RouteConfig, UpstreamConfig
from resilient_ambassador.core.messages import Handler
from resilient_ambassador.core.redact import Json, config_document
from resilient_ambassador.core.retry import RetryBudget
from resilient_ambassador.net.admin import AdminServer, Readiness
from resilient_ambassador.net.server import HttpServer, RouteRuntime
from resilient_ambassador.net.upstream import ConnectionPool, UpstreamClient
from resilient_ambassador.secrets import SecretResolver
from resilient_ambassador.stages.breaker import BreakerStage, maybe_breaker
from resilient_ambassador.stages.cache import CacheStage, CacheStats
from resilient_ambassador.stages.retry import RetryStage
from resilient_ambassador.stores.cache_memory import CacheStore, MemoryCacheStore
from resilient_ambassador.stores.cache_redis import RedisCacheStore
from resilient_ambassador.stores.errors import StoreUnavailable
from resilient_ambassador.stores.redis_client import RedisRunner
from resilient_ambassador.stores.shared_breaker import SharedBreakerSync

log = logging.getLogger("resilient_ambassador")

# How often idle pooled connections are checked for expiry or a peer close.
POOL_SWEEP_INTERVAL_S = 5.0
LISTEN_BACKLOG = 4096


def upstream_host(config: UpstreamConfig) -> bytes:
    return (config.host_header or config.url.authority).encode()


def build_pipeline(
    route: RouteConfig, upstream: Handler, *, cache: Callable[[Handler], Handler] | None = None
) -> Handler:
    """A route's chain of stages, outermost first: retry -> breaker -> upstream client.

    `upstream` is the upstream's shared breaker (or its client when the breaker is off): one
    breaker per upstream, whatever the number of routes. Retry sits outside it, so every
    attempt passes the breaker and an open breaker is never retried. Cache and rate limit
    slot in here as they land (cache outermost: a hit spends no quota; rate limit between
    retry and breaker: every attempt takes a token)."""
    handler = upstream
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
        handler = cache(handler)  # outermost: a hit spends no retry budget and no quota
    return handler


@final
@dataclass
class BoundListeners:
    """Sockets bound before serving: one list per data listener, and the admin listener's."""

    data: list[list[trio.SocketListener]]
    admin: list[trio.SocketListener] = field(default_factory=list)

    def close(self) -> None:
        for listeners in (*self.data, self.admin):
            for listener in listeners:
                listener.socket.close()


@final
class App:
    def __init__(self, config: Config, secrets: SecretResolver | None = None) -> None:
        self.config = config
        self.secrets = secrets or SecretResolver()
        self.pools = {name: ConnectionPool(up) for name, up in config.upstreams.items()}
        self.clients = {
            name: UpstreamClient(up, self.pools[name], self.secrets) for name, up in config.upstreams.items()
        }
        # One breaker per upstream, shared by its routes; a route with a `breaker` of its own
        # gets its own (named upstream/route) around the same client.
        self.breakers = {
            name: maybe_breaker(self.clients[name], up.breaker, name) for name, up in config.upstreams.items()
        }
        for listener in config.listeners:
            for route in listener.routes:
                if route.breaker is not None:
                    name = self.breaker_name(route)
                    self.breakers[name] = maybe_breaker(self.clients[route.upstream], route.breaker, name)
        # Shared breaker state: an open breaker here opens it on every daemon using this Redis.
        # One Redis runner (creating it does no I/O) for every kind of shared state, so a dead
        # Redis trips one breaker and costs one budget, whichever policy noticed first.
        self.redis: RedisRunner | None = None
        if config.redis.url is not None:
            self.redis = RedisRunner.from_url(config.redis.url, timeout_s=config.redis.timeout_s)
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
        self.servers: list[HttpServer] = []
        for listener in config.listeners:
            routes = {
                id(route): RouteRuntime(
                    config=route,
                    handler=build_pipeline(
                        route, self.breakers[self.breaker_name(route)], cache=self._cache_for(route)
                    ),
                    upstream_host=upstream_host(config.upstreams[route.upstream]),
                )
                for route in listener.routes
            }
            self.servers.append(HttpServer(listener, routes))
        self.admin = (
            AdminServer(
                readiness=self.readiness,
                stats=self.stats,
                config=self.config_document,
                purge=self.purge_cache if self.cache_store is not None else None,
            )
            if config.admin.enabled
            else None
        )
        self.admin_addresses: list[tuple[str, int]] = []
        self._accepting: trio.CancelScope | None = None
        self._connections: trio.CancelScope | None = None
        self._serving = False
        self._started_at: float | None = None
        self.draining = False

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

    def _cache_for(self, route: RouteConfig) -> Callable[[Handler], Handler] | None:
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
                authority=upstream_host(self.config.upstreams[route.upstream]),
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

    async def bind(self) -> BoundListeners:
        """Bind every listener and the admin listener, all or nothing (a port in use fails
        the whole start)."""
        bound = BoundListeners([])
        try:
            for server in self.servers:
                bound.data.append(
                    await trio.open_tcp_listeners(
                        server.config.port, host=server.config.host, backlog=LISTEN_BACKLOG
                    )
                )
            if self.admin is not None:
                admin = self.config.admin
                bound.admin = await trio.open_tcp_listeners(admin.port, host=admin.host)
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
        """Serve on the bound listeners (binding them if not given), report the addresses,
        serve until `drain()`; then wait for in-flight requests up to the grace period."""
        if bound is None:
            bound = await self.bind()
        addresses: list[tuple[str, int]] = [
            listener.socket.getsockname()[:2] for listeners in bound.data for listener in listeners
        ]
        self.admin_addresses = [listener.socket.getsockname()[:2] for listener in bound.admin]
        self._started_at = trio.current_time()
        try:
            # The admin listener runs in the background nursery, which outlives the data
            # connections: /readyz keeps answering 503 through the whole drain, and the admin
            # listener closes last.
            async with trio.open_nursery() as background:
                if self.breaker_sync is not None:
                    await background.start(self.breaker_sync.run)
                if self.cache_store is not None:
                    await background.start(self.cache_store.run)
                for stage in self.cache_stages:
                    await background.start(stage.run)
                if self.admin is not None and bound.admin:
                    background.start_soon(trio.serve_listeners, self.admin.handle_connection, bound.admin)
                    log.info("admin listener on %s", ", ".join(_address(lst) for lst in bound.admin))
                await self._serve_connections(bound.data, addresses, task_status)
                background.cancel_scope.cancel()
        finally:
            self._serving = False
            for pool in self.pools.values():
                pool.close_idle()
            bound.close()
            if self.redis is not None:
                with trio.CancelScope(shield=True):
                    await self.redis.aclose()

    async def _serve_connections(
        self,
        bound: list[list[trio.SocketListener]],
        addresses: list[tuple[str, int]],
        task_status: trio.TaskStatus[list[tuple[str, int]]],
    ) -> None:
        with trio.CancelScope() as connections:
            self._connections = connections
            async with trio.open_nursery() as connection_nursery, trio.open_nursery() as accept_nursery:
                self._accepting = accept_nursery.cancel_scope
                for server, listeners in zip(self.servers, bound, strict=True):
                    accept_nursery.start_soon(
                        partial(
                            trio.serve_listeners,
                            server.handle_connection,
                            listeners,
                            handler_nursery=connection_nursery,
                        )
                    )
                accept_nursery.start_soon(self._sweep_pools)
                for server, listeners in zip(self.servers, bound, strict=True):
                    log.info(
                        "listener %s on %s (%d routes)",
                        server.config.name,
                        ", ".join(_address(listener) for listener in listeners),
                        len(server.config.routes),
                    )
                self._serving = True
                task_status.started(addresses)
        if connections.cancelled_caught:
            log.warning("grace period over: closed the connections still open")

    def readiness(self) -> Readiness:
        if self.draining:
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
        shared: Json = None
        if self.breaker_sync is not None and self.redis is not None:
            sync, redis = self.breaker_sync, self.redis
            shared = {
                "replica_id": sync.replica_id,
                "published": sync.published,
                "cleared": sync.cleared,
                "forced_opens": sync.forced_opens,
                "sync_errors": sync.sync_errors,
                "redis": {
                    "healthy": redis.healthy,
                    "calls": redis.calls,
                    "failures": redis.failures,
                    "skipped": redis.skipped,
                },
            }
        return {
            "ready": self.readiness() == "ready",
            "draining": self.draining,
            "uptime_s": round(now - self._started_at, 3) if self._started_at is not None else 0.0,
            "listeners": listeners,
            "upstreams": upstreams,
            "breakers": breakers,
            "shared_breaker": shared,
            "cache": self._cache_stats(),
        }

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


def _address(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run(config: Config, secrets: SecretResolver | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain; a second signal stops at once. Installing
    handlers also makes SIGTERM work when we are PID 1 in a container, where the kernel
    ignores signals that have no handler."""
    app = App(config, secrets)
    bound = await app.bind()  # outside the nursery: a bind error surfaces as a plain OSError
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain_on_signals, app, received)
            await app.serve(bound)
            nursery.cancel_scope.cancel()


async def _drain_on_signals(app: App, received: AsyncIterator[int]) -> None:
    async for signum in received:
        name = signal.Signals(signum).name
        if app.draining:
            log.warning("second %s: stopping now", name)
            app.stop_now()
        else:
            log.info("%s received", name)
            app.drain()
