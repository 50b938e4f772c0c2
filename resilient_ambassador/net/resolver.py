"""Upstream name resolution and connecting through the answer (service discovery).

One `Resolver` per process serves every HTTP upstream pool and tcp relay. Upstream names are
re-resolved: an answer is used for at most `dns.max_ttl_s` (getaddrinfo gives no TTL, so like
nginx's `resolver valid=` that is the cache lifetime), then served stale for up to
`dns.max_stale_s` while one background task refreshes it (stale-while-revalidate, and
stale-if-error when the refresh fails). A fresh answer costs no system call and no thread.
A failed lookup is remembered for `dns.negative_ttl_s` (UpstreamDNSError at once meanwhile).
Concurrent misses for one name share one lookup.

getaddrinfo (in a thread, as trio does it) rather than a DNS client library: it honours
/etc/hosts, nsswitch and the pod's resolv.conf search path and ndots, which is what makes
Kubernetes service names such as `api.default.svc` resolve exactly as they do for the app.

A connect tries the addresses of the answer Happy Eyeballs style (RFC 8305): the next attempt
starts when the previous one fails or after `HAPPY_EYEBALLS_DELAY_S`, the first to connect
wins and the others are closed. The start rotates over the addresses (spreading connections
over the pods of a headless service); addresses whose last connect failed are tried last.

IP literals bypass the resolver. Foreign errors (gaierror, OSError) become `core.errors` here.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, final

import trio

from resilient_ambassador.core.config import DNSConfig
from resilient_ambassador.core.dns import Address, DNSEntry, DNSTimes, ip_literal
from resilient_ambassador.core.errors import UpstreamConnectError, UpstreamDNSError
from resilient_ambassador.core.log_throttle import LogThrottle

log = logging.getLogger("resilient_ambassador.resolver")

# RFC 8305 section 5 recommends 250 ms between connection attempts (trio's default too).
HAPPY_EYEBALLS_DELAY_S = 0.25
# Names come from the config, so this is only a backstop against reloads adding names forever.
MAX_ENTRIES = 1024
# Lookup threads at once (see SystemLookup); lookups are one per name at a time, so this only
# binds when DNS hangs and abandoned lookups pile up.
MAX_LOOKUP_THREADS = 8

Lookup = Callable[[str], Awaitable[Sequence[Address]]]

_GAI_NAMES = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}


@final
class SystemLookup:
    """The default lookup: getaddrinfo in a worker thread, A and AAAA records in the order the
    system resolver gives them (RFC 6724). A lookup past `dns.timeout` is abandoned, but its
    thread runs on until glibc gives up (timeout x attempts x search domains: easily 30 s with
    an unreachable CoreDNS), so these threads get a limiter of their own: a hung resolver
    holds at most `max_threads` of them, never the default limiter's threads that the access
    log writes through. A lookup that cannot get a thread in time fails like a slow one."""

    def __init__(
        self,
        max_threads: int = MAX_LOOKUP_THREADS,
        getaddrinfo: Callable[..., list[Any]] = socket.getaddrinfo,
    ) -> None:
        self._max_threads = max_threads
        self._getaddrinfo = getaddrinfo
        self._limiter: trio.CapacityLimiter | None = None

    @property
    def limiter(self) -> trio.CapacityLimiter:
        if self._limiter is None:  # made on first use, inside the trio run
            self._limiter = trio.CapacityLimiter(self._max_threads)
        return self._limiter

    async def __call__(self, host: str) -> list[Address]:
        infos = await trio.to_thread.run_sync(
            self._getaddrinfo,
            host,
            None,
            0,
            socket.SOCK_STREAM,
            abandon_on_cancel=True,
            limiter=self.limiter,
        )
        out: list[Address] = []
        for family, _, _, _, sockaddr in infos:
            match sockaddr:
                case (str(ip), int(), int(), int(scope_id)) if family == socket.AF_INET6:
                    out.append(Address(family, ip, scope_id))
                case (str(ip), int()) if family == socket.AF_INET:
                    out.append(Address(family, ip))
        return list(dict.fromkeys(out))


def describe_lookup_error(exc: BaseException) -> str:
    """`Name or service not known (EAI_NONAME)` for a gaierror; the message otherwise."""
    if isinstance(exc, socket.gaierror) and exc.errno in _GAI_NAMES:
        return f"{exc.strerror} ({_GAI_NAMES[exc.errno]})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@final
@dataclass(slots=True)
class ResolverStats:
    """Totals since start for /stats (`dns`)."""

    lookups: int = 0  # calls to the lookup function (getaddrinfo)
    failures: int = 0  # lookups that failed or timed out
    hits: int = 0  # answered from a fresh cache entry
    negative_hits: int = 0  # answered from a cached failure
    stale_served: int = 0  # answered from an expired entry while it was being refreshed
    refreshes: int = 0  # background refreshes started
    connect_failures: int = 0  # per address that refused, was unreachable, ...


@final
class _Pending:
    """A lookup in flight: waiters wait on `done`; `entry` is None if it was cancelled."""

    __slots__ = ("done", "entry")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.entry: DNSEntry | None = None


@final
class Resolver:
    """A caching resolver for upstream names. `run` (started in the app's background nursery)
    hosts the lookup tasks; without it (a pool used on its own) lookups run in the caller."""

    def __init__(
        self,
        config: DNSConfig | None = None,
        lookup: Lookup | None = None,
        *,
        stagger_s: float = HAPPY_EYEBALLS_DELAY_S,
    ) -> None:
        self.config = config or DNSConfig()
        self._times = DNSTimes(self.config.max_ttl_s, self.config.negative_ttl_s, self.config.max_stale_s)
        self._lookup_fn: Lookup = lookup or SystemLookup()
        self._stagger_s = stagger_s
        self._entries: dict[str, DNSEntry] = {}
        self._pending: dict[str, _Pending] = {}
        self._nursery: trio.Nursery | None = None
        self._log_throttle = LogThrottle()
        self.stats = ResolverStats()

    @property
    def entries(self) -> int:
        return len(self._entries)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host background lookups until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def connect(self, host: str, port: int, *, upstream: str) -> trio.SocketStream:
        """A TCP stream to `host:port`, through the first address of its answer that
        connects. UpstreamDNSError if the name does not resolve, UpstreamConnectError if no
        address connects. The caller bounds the whole with its connect timeout."""
        literal = ip_literal(host)
        if literal is not None:
            return await self._connect_addresses(host, port, [literal], None, upstream)
        entry = await self.resolve(host, upstream=upstream)
        return await self._connect_addresses(host, port, entry.connect_order(), entry, upstream)

    async def resolve(self, host: str, *, upstream: str | None = None) -> DNSEntry:
        """The cache entry holding `host`'s addresses; UpstreamDNSError if it has none."""
        while True:
            now = trio.current_time()
            entry = self._entries.get(host)
            if entry is not None:
                if entry.is_fresh(now):
                    if entry.error is None:
                        self.stats.hits += 1
                    else:
                        self.stats.negative_hits += 1
                    return self._answer(host, entry, upstream)
                if self._nursery is not None and entry.can_serve_stale(now):
                    if host not in self._pending and now >= entry.retry_at:
                        self.stats.refreshes += 1
                        self._start_lookup(host, self._nursery)
                    self.stats.stale_served += 1
                    return entry
            pending = self._pending.get(host)
            if pending is None:
                if self._nursery is not None:
                    pending = self._start_lookup(host, self._nursery)
                else:  # no background runner: this task looks the name up itself
                    pending = _Pending()
                    self._pending[host] = pending
                    await self._run_lookup(host, pending)
            await pending.done.wait()
            if pending.entry is not None:
                return self._answer(host, pending.entry, upstream)
            # The lookup was cancelled (the resolver is stopping): look again.

    def _answer(self, host: str, entry: DNSEntry, upstream: str | None) -> DNSEntry:
        if entry.error is not None:
            raise UpstreamDNSError(
                f"upstream DNS resolution failed for {host}: {entry.error}", upstream=upstream
            )
        return entry

    def _start_lookup(self, host: str, nursery: trio.Nursery) -> _Pending:
        pending = _Pending()
        self._pending[host] = pending  # before the task runs: one lookup per name at a time
        nursery.start_soon(self._run_lookup, host, pending)
        return pending

    async def _run_lookup(self, host: str, pending: _Pending) -> None:
        try:
            pending.entry = await self._lookup(host)
        finally:
            if self._pending.get(host) is pending:
                del self._pending[host]
            pending.done.set()

    async def _lookup(self, host: str) -> DNSEntry:
        """One lookup, bounded by `dns.timeout_s`, stored in the cache. A failure replaces
        the entry with a negative one, unless the old answer may still be served stale."""
        self.stats.lookups += 1
        timeout_s = self.config.timeout_s
        addresses: Sequence[Address] = ()
        error: str | None = None
        try:
            with trio.move_on_after(timeout_s) as scope:
                addresses = await self._lookup_fn(host)
            if scope.cancelled_caught:
                error = f"no answer within {timeout_s:g}s"
            elif not addresses:
                error = "no A or AAAA records"
        except (OSError, ValueError) as exc:  # gaierror; UnicodeError for a bad IDNA label
            error = describe_lookup_error(exc)
        now = trio.current_time()
        previous = self._entries.get(host)
        if error is None:
            entry = DNSEntry.positive(addresses, now, self._times, previous)
            # As a set: CoreDNS's loadbalance plugin shuffles the records of every answer.
            if previous is None or set(previous.addresses) != set(entry.addresses):
                log.info("%s resolves to %s", host, ", ".join(str(a) for a in entry.addresses))
        else:
            self.stats.failures += 1
            if previous is not None and previous.can_serve_stale(now):
                previous.retry_at = now + self._times.negative_ttl_s
                self._warn(host, "refreshing %s failed (%s); serving the previous answer", host, error)
                return previous
            entry = DNSEntry.negative(error, now, self._times)
            self._warn(host, "upstream DNS resolution failed for %s: %s", host, error)
        if len(self._entries) >= MAX_ENTRIES and host not in self._entries:
            self._prune(now)
        self._entries[host] = entry
        return entry

    def _prune(self, now: float) -> None:
        for name in [n for n, e in self._entries.items() if now >= e.stale_until]:
            del self._entries[name]

    async def _connect_addresses(
        self, host: str, port: int, addresses: list[Address], entry: DNSEntry | None, upstream: str
    ) -> trio.SocketStream:
        """Happy Eyeballs over `addresses` (RFC 8305 section 5): start the next attempt when
        the previous one failed or after the stagger delay; the first connected socket wins
        and every other one is closed."""
        winner: trio.socket.SocketType | None = None
        errors: list[tuple[Address, OSError]] = []
        sockets: list[trio.socket.SocketType] = []

        async def attempt(address: Address, failed: trio.Event, nursery: trio.Nursery) -> None:
            nonlocal winner
            try:
                sock = trio.socket.socket(address.family, socket.SOCK_STREAM)
                sockets.append(sock)
                await sock.connect(address.sockaddr(port))
            except OSError as exc:
                errors.append((address, exc))
                self.stats.connect_failures += 1
                if entry is not None:
                    entry.report(address, ok=False)
                failed.set()
                return
            if winner is not None:  # another attempt connected at the same moment
                return
            winner = sock
            if entry is not None:
                entry.report(address, ok=True)
            nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                for address in addresses:
                    failed = trio.Event()
                    nursery.start_soon(attempt, address, failed, nursery)
                    with trio.move_on_after(self._stagger_s):
                        await failed.wait()
        finally:
            for sock in sockets:
                if sock is not winner:
                    sock.close()
        if winner is not None:
            return trio.SocketStream(winner)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if len(errors) == 1:
            detail = _strerror(errors[0][1])
        else:
            detail = f"all {len(errors)} addresses failed: " + "; ".join(
                f"{address}: {_strerror(exc)}" for address, exc in errors
            )
        raise UpstreamConnectError(f"connect to {authority} failed: {detail}", upstream=upstream)

    def _warn(self, key: str, message: str, *args: object) -> None:
        suppressed = self._log_throttle.allow(key, trio.current_time())
        if suppressed is None:
            return
        more = f" ({suppressed} more since the last line)" if suppressed else ""
        log.warning(message + more, *args)


def _strerror(exc: OSError) -> str:
    """`Connection refused`, not trio's `Error connecting to ('10.0.0.7', 80): ...`."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
