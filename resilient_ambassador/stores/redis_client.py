"""The one place that makes redis-py clients, and the one way to call them from trio.

redis-py has no trio client and its sync client blocks whatever thread calls it, so every call
runs in a worker thread (`RedisRunner.call`) under a time budget; a call past its budget is
abandoned (the thread finishes on its own, bounded by the socket timeout) and the caller falls
back to local state. redis-py's default retries are off: with them a refused Redis took ~5 s
and a frozen one ~9 s per call (HARDENING.md), which no budget can hide from a thread pool.

Topologies (core.redis_target, docs/redis-topologies.md): one server (redis://, rediss://,
unix://), a Sentinel-managed master (sentinel://: the client asks the Sentinels for the master
on every new connection, so a promoted replica is found after the old master's connections
fail), and a Redis Cluster (redis+cluster://: redis-py's `RedisCluster`, which follows MOVED
and re-reads the slot map after a node fails). A Cluster client reads the slot map when it is
made, so it is made in a thread: by `RedisRunner.connect`, which the app starts in the
background, or else by the first call. A daemon starts while its Cluster is down and connects
once it answers.

Lua scripts run through `LuaScript`: EVALSHA, and EVAL where a server (or Cluster node) does
not know the script yet. Never SCRIPT LOAD: in a Cluster it goes to every master, and fails
whenever one of them is down although the script's own key lives elsewhere.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeVar, final

import redis
import trio
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel

from resilient_ambassador.core.config import TLSConfig
from resilient_ambassador.core.redis_target import RedisTarget, parse_redis_target
from resilient_ambassador.stores.errors import StoreUnavailable

log = logging.getLogger("resilient_ambassador.redis")

T = TypeVar("T")
RedisClient: TypeAlias = "redis.Redis | RedisCluster"

# Worker threads (and pooled connections) for Redis calls. A few are enough: calls are short,
# and while Redis is frozen each stuck thread is bounded by the socket timeout.
DEFAULT_MAX_THREADS = 4
# Consecutive unavailable calls before the runner stops calling Redis for a cool-down, so a
# dead or frozen Redis costs one budget per cool-down, not one per call.
DEFAULT_TRIP_AFTER = 2
DEFAULT_COOLDOWN_S = 1.0
# Ping idle pooled connections before reuse after this long (whole seconds, redis-py's unit):
# a connection to a Redis that restarted is noticed before a real command is sent on it.
HEALTH_CHECK_INTERVAL_S = 5
_MIN_TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Replies that mean "this Redis cannot serve now" although it answered: a Cluster without a
# master for the slot (CLUSTERDOWN), a slot being moved (TRYAGAIN, ASK past redirects), a
# demoted master still reached through an old connection (READONLY). They count against
# availability like a dead socket, where other refusals (OOM, a script error) do not.
_UNAVAILABLE_REPLIES = (ClusterError, TryAgainError, AskError, ReadOnlyError)
# Replies to a script sent to a Cluster node that another try through the Cluster client can
# fix: the slot moved (MOVED, ASK), is migrating (TRYAGAIN), a failover is under way
# (CLUSTERDOWN), or the node does not have the script (NOSCRIPT).
_ELSEWHERE_REPLIES = (AskError, TryAgainError, ClusterError, NoScriptError)
ScriptCall: TypeAlias = "tuple[Sequence[str | bytes], Sequence[Any]]"


def _socket_options(timeout_s: float) -> dict[str, Any]:
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }


def _tls_options(tls: TLSConfig | None) -> dict[str, Any]:
    """redis-py's ssl_* options for `tls` (None: system CAs, verification on)."""
    tls = tls or TLSConfig()
    return {
        "ssl_ca_certs": tls.ca_file,
        "ssl_certfile": tls.cert_file,
        "ssl_keyfile": tls.key_file,
        "ssl_cert_reqs": "required" if tls.verify else "none",
        "ssl_check_hostname": tls.verify,
        "ssl_min_version": _MIN_TLS_VERSIONS[tls.min_version],
    }


def make_redis(
    url: str,
    *,
    timeout_s: float = 0.25,
    max_connections: int = DEFAULT_MAX_THREADS,
    tls: TLSConfig | None = None,
) -> redis.Redis:
    """A redis-py client for a one-server or Sentinel `url` that fails fast: connect and
    socket timeouts of `timeout_s`, no retries (Retry with 0 retries; `retry_on_timeout` left
    at its default False, since redis-py 6 deprecates passing it), a small pool. Query-string
    options in the URL win over these (redis-py's rule), so keep timeouts out of the URL.
    Creating the client does no I/O. A Cluster URL needs `connector` (its client does I/O)."""
    target = parse_redis_target(url)
    options: dict[str, Any] = {
        **_socket_options(timeout_s),
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        # At least the number of threads that may use it at once, or redis-py raises
        # "Too many connections" instead of waiting.
        "max_connections": max_connections,
    }
    if target.mode == "cluster":
        raise ValueError("a Redis Cluster client reads the slot map when made: use connector()")
    if target.mode == "sentinel":
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=_socket_options(timeout_s))  # type: ignore[no-untyped-call]
        master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            target.service_name or "",
            db=target.db,
            username=target.username,
            password=target.password,
            **options,
        )
        return master
    if target.tls:
        options.update(_tls_options(tls))
    client: redis.Redis = redis.Redis.from_url(url, **options)
    return client


def connector(
    url: str,
    *,
    timeout_s: float = 0.25,
    max_connections: int = DEFAULT_MAX_THREADS,
    tls: TLSConfig | None = None,
) -> Callable[[], RedisClient]:
    """What makes the client for `url`, for `RedisRunner`, which calls it in a worker thread."""
    target = parse_redis_target(url)
    if target.mode != "cluster":
        return lambda: make_redis(url, timeout_s=timeout_s, max_connections=max_connections, tls=tls)
    return lambda: _make_cluster(target, timeout_s=timeout_s, max_connections=max_connections, tls=tls)


def _make_cluster(
    target: RedisTarget, *, timeout_s: float, max_connections: int, tls: TLSConfig | None
) -> RedisCluster:
    """redis-py's Cluster client, failing as fast as the one-server client: no cluster-level
    retries (its default backs off for seconds), no per-node retries (redis-py's own choice).
    `require_full_coverage` off: slots whose master is down fail alone, the others serve."""
    options: dict[str, Any] = {
        **_socket_options(timeout_s),
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "max_connections": max_connections,  # per node
        "username": target.username,
        "password": target.password,
    }
    if target.tls:
        options.update(ssl=True, **_tls_options(tls))
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],  # type: ignore[no-untyped-call]
        require_full_coverage=False,
        **options,
    )


@final
class LuaScript:
    """One Lua script, by SHA1: EVALSHA, and EVAL (which also caches it on that server) where
    the reply is NOSCRIPT: a restarted or flushed server, a Cluster node that never ran it, a
    replica promoted by a failover. `keys` must share one hash slot in a Cluster; every script
    here takes one key. redis-py's Cluster pipeline blocks `evalsha` and asks a node for the
    keys of every script it carries, so batches go to each master in a plain pipeline
    (`run_batch`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __call__(self, client: RedisClient, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)

    def run_batch(self, client: RedisClient, calls: Sequence[ScriptCall]) -> list[Any]:
        """Every `(keys, args)` in one pipeline, the NOSCRIPT ones again with EVAL in a
        second; replies in order, errors as values. A Cluster gets one pipeline per master."""
        if isinstance(client, RedisCluster):
            return self._run_batch_per_node(client, calls)
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
        replies: list[Any] = pipe.execute(raise_on_error=False)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            pipe = client.pipeline(transaction=False)
            for i in missing:
                keys, args = calls[i]
                pipe.execute_command("EVAL", self.source, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
            for i, reply in zip(missing, pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        return replies

    def _run_batch_per_node(self, client: RedisCluster, calls: Sequence[ScriptCall]) -> list[Any]:
        """One plain pipeline per master, from the client's slot map. Not redis-py's Cluster
        pipeline: it asks the default node COMMAND GETKEYS for every script in it (a round
        trip each, and none at all once that node is down), and one dead master fails the
        whole batch. Here a dead master fails only its own keys (as values) while any node
        still answers for the slot map, which the client then re-reads; replies that say the
        slot is elsewhere or busy (MOVED, ASK,
        TRYAGAIN, CLUSTERDOWN) and NOSCRIPT go again one by one through the Cluster client,
        which follows redirects."""
        replies: list[Any] = [None] * len(calls)
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, (keys, _) in enumerate(calls):
            node = client.get_node_from_key(keys[0])  # type: ignore[no-untyped-call]
            by_node.setdefault(node.name, (node, []))[1].append(i)
        again: list[int] = []
        lost_node = False
        for node, indexes in by_node.values():
            connection = node.redis_connection
            if connection is None:  # not connected since the last slot map: let the client route
                again.extend(indexes)
                continue
            pipe = connection.pipeline(transaction=False)
            for i in indexes:
                keys, args = calls[i]
                pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
            try:
                node_replies = pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                lost_node = True
                for i in indexes:
                    replies[i] = exc
                continue
            for i, reply in zip(indexes, node_replies, strict=True):
                if isinstance(reply, _ELSEWHERE_REPLIES):
                    again.append(i)
                else:
                    replies[i] = reply
        if lost_node:
            # Re-read the slot map (a replica may have taken the slots over). When no node
            # answers that either, the Cluster is gone: raise, so the runner counts it.
            client.nodes_manager.initialize()
        for i in again:
            keys, args = calls[i]
            try:
                replies[i] = self(client, keys, args)
            except (redis.RedisError, RedisClusterException) as exc:
                replies[i] = exc
        return replies


@final
class RedisRunner:
    """Runs blocking redis-py calls off the trio thread, each within `budget_s`.

    Any Redis or OS error, and running out of budget, comes out as `StoreUnavailable`; a
    `ResponseError` (Redis answered, but refused the command: OOM, a script error) too, but
    it does not count against availability. After `trip_after` consecutive unavailable calls
    the runner refuses calls at once for `cooldown_s` (its own small circuit breaker), then
    lets calls through again; one success makes it healthy. Transitions are logged once each,
    never per call. Cancellation from the caller's own scopes propagates unchanged.
    """

    def __init__(
        self,
        client: RedisClient | Callable[[], RedisClient],
        *,
        budget_s: float = 0.25,
        max_threads: int = DEFAULT_MAX_THREADS,
        trip_after: int = DEFAULT_TRIP_AFTER,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        # A client, or what makes one: called once, in the first call's worker thread.
        self._client: RedisClient | None = None
        self._connect: Callable[[], RedisClient] | None = None
        if isinstance(client, (redis.Redis, RedisCluster)):
            self._client = client
        else:
            self._connect = client
        self._connecting = threading.Lock()
        self.budget_s = budget_s
        self._limiter = trio.CapacityLimiter(max_threads)
        self._trip_after = trip_after
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive_failures = 0
        self._skip_until: float | None = None  # on `clock`: refuse calls until then
        self._healthy = True  # optimistic until the first failure: nothing to log at start
        self.calls = 0
        self.failures = 0
        self.skipped = 0

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = 0.25,
        max_threads: int = DEFAULT_MAX_THREADS,
        tls: TLSConfig | None = None,
    ) -> RedisRunner:
        """A runner with its own client for any `redis.url` topology: socket timeouts and call
        budget both `timeout_s`. No I/O here (a Cluster client is made by the first call)."""
        return cls(
            connector(url, timeout_s=timeout_s, max_connections=max_threads, tls=tls),
            budget_s=timeout_s,
            max_threads=max_threads,
        )

    @property
    def client(self) -> RedisClient | None:
        """The client, once made (None before the first call for a lazily made one)."""
        return self._client

    async def connect(self) -> bool:
        """Make the client now, in a thread and without a call's budget (a Cluster client
        reads the slot map and the command table: ~0.1 s on loopback), so requests do not
        pay for it. The app starts this in the background; False (logged) if Redis did not
        answer, and the first calls try again."""
        if self._client is not None:
            return True
        try:
            await trio.to_thread.run_sync(lambda: self._connected(None), abandon_on_cancel=True)
        except (redis.RedisError, RedisClusterException, OSError) as exc:
            log.info("redis not reachable at start (%s): calls will try again", _first_line(exc))
            return False
        return True

    def _connected(self, wait_s: float | None) -> RedisClient:
        """The client, made now if need be, in a worker thread. A call waits for another
        thread's connect for no longer than `wait_s` (its budget), so abandoned threads do not
        pile up behind a slow one."""
        client = self._client
        if client is not None:
            return client
        if not self._connecting.acquire(timeout=-1 if wait_s is None else wait_s):
            raise _StillConnecting
        try:
            if self._client is None:
                assert self._connect is not None
                self._client = self._connect()
            return self._client
        finally:
            self._connecting.release()

    @property
    def healthy(self) -> bool:
        """False from the `trip_after`th consecutive failure until the next success."""
        return self._healthy

    async def call(self, fn: Callable[[RedisClient], T], *, budget_s: float | None = None) -> T:
        """`fn(client)` in a worker thread; its result, or StoreUnavailable."""
        if self._skip_until is not None and self._clock() < self._skip_until:
            self.skipped += 1
            raise StoreUnavailable("redis skipped: cooling down after consecutive failures")
        self.calls += 1
        outcome: T
        with trio.move_on_after(self.budget_s if budget_s is None else budget_s):
            try:
                outcome = await trio.to_thread.run_sync(
                    lambda: fn(self._connected(self.budget_s)), abandon_on_cancel=True, limiter=self._limiter
                )
            except _StillConnecting:
                # Not Redis's fault: another thread is making the client. Not a failure.
                self.skipped += 1
                raise StoreUnavailable("redis skipped: still connecting") from None
            except _UNAVAILABLE_REPLIES as exc:
                self._failed(f"{type(exc).__name__}: {_first_line(exc)}")
                raise StoreUnavailable(f"redis cannot serve now: {_first_line(exc)}") from exc
            except redis.ResponseError as exc:
                # Redis is up and answered; the command itself was refused.
                self._succeeded()
                raise StoreUnavailable(f"redis refused the command: {_first_line(exc)}") from exc
            except (redis.RedisError, RedisClusterException, OSError) as exc:
                # RedisClusterException: no node answered the slot map, or a slot has none.
                self._failed(f"{type(exc).__name__}: {_first_line(exc)}")
                raise StoreUnavailable(f"redis unavailable: {_first_line(exc)}") from exc
            self._succeeded()
            return outcome
        self._failed("no answer within the budget")
        raise StoreUnavailable("redis did not answer within the budget")

    async def aclose(self) -> None:
        """Close the pool's connections (in a thread, bounded: a stuck call may hold a lock)."""
        client = self._client
        if client is None:
            return
        with trio.move_on_after(self.budget_s):
            await trio.to_thread.run_sync(client.close, abandon_on_cancel=True)

    def _succeeded(self) -> None:
        self._consecutive_failures = 0
        self._skip_until = None
        if not self._healthy:
            self._healthy = True
            log.info("redis reachable again: shared state resumes")

    def _failed(self, why: str) -> None:
        self.failures += 1
        self._consecutive_failures += 1
        if self._consecutive_failures < self._trip_after:
            return
        self._skip_until = self._clock() + self._cooldown_s
        if self._healthy:
            self._healthy = False
            log.warning(
                "redis unavailable (%s): using local state; calls skipped for %gs at a time until it answers",
                why,
                self._cooldown_s,
            )


class _StillConnecting(Exception):
    """Another thread holds the connect lock past this call's budget."""


def _first_line(exc: BaseException) -> str:
    # redis-py messages can carry a host:port but never a password; keep them short.
    return (str(exc).splitlines() or [""])[0][:200]
