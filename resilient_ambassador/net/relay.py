"""TCP relay for `protocol: tcp` listeners: accept, pick an upstream address, optionally
originate TLS (and terminate it on the listener side), then pump bytes both ways.

Shape (after mitmproxy's `proxy/layers/tcp.py`): two pumps, one per direction. Each reads a
chunk and `send_all`s it before reading again, so a slow reader slows the writer down
(back-pressure) and at most one chunk per direction is ever buffered here. An EOF is passed on
as a half-close (`send_eof`), and the tunnel ends when both directions are done, when either
side resets (the reset is passed on: the other side is closed with SO_LINGER 0, so its peer
sees a reset rather than a clean end), or when no byte moved either way for `idle_timeout_s`.

TLS streams cannot half-close (TLS has no write-side shutdown that peers honour), so an EOF
towards a TLS side is not passed on: that direction stops, and the tunnel lasts until the
other direction ends or the idle timeout fires. Missing close_notify at the end of a TLS
upstream is treated as a plain EOF (as browsers do), not as a reset.

Foreign exceptions are mapped to `core.errors` when connecting, so the breaker stage
classifies them exactly as it does for HTTP upstreams.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import final

import trio

from resilient_ambassador.core.config import ListenerConfig, RelayConfig, UpstreamURL
from resilient_ambassador.core.errors import (
    BreakerOpen,
    ProxyError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamTLSError,
)
from resilient_ambassador.core.log_throttle import LogThrottle
from resilient_ambassador.core.messages import Handler, Request, Response
from resilient_ambassador.core.ratelimit import ConnectionRate
from resilient_ambassador.net import sockio
from resilient_ambassador.net.resolver import Resolver
from resilient_ambassador.net.tls import client_context, server_context
from resilient_ambassador.stages.breaker import BreakerStage

log = logging.getLogger("resilient_ambassador.relay")

# Bytes asked for per read. Each pump holds at most one chunk, so this bounds the relay's
# buffering at 2 chunks per tunnel (128 MiB at 1000 tunnels). bench/relay.py found 16 KiB
# costs ~50% more CPU per GB, and 256 KiB-1 MiB no clear gain over 64 KiB (bench/README.md).
CHUNK_BYTES = 65536
# The socket pump yields to other tasks after this many chunks in a row that never had to wait.
YIELD_EVERY = 16
# A client that opens a TLS listener connection and never finishes the handshake is dropped
# after this (the slowloris guard of the TLS terminator).
HANDSHAKE_TIMEOUT_S = 10.0
# How long a clean TLS close (close_notify) may take before the socket is just closed.
TLS_CLOSE_S = 1.0

_LINGER_RESET = struct.pack("ii", 1, 0)
# Linux splice(2): once a tunnel reads a full chunk (a bulk transfer), each direction moves
# bytes through a pipe of its own without copying them into Python; bench/relay.py measured
# ~1.7x the throughput and ~40% less CPU per GB than os.read/os.write. Small exchanges never
# open a pipe (two more file descriptors per direction), and without one the copy path runs.
SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


@final
@dataclass(slots=True)
class RelayStats:
    """Totals since start for /stats (`tcp_listeners`)."""

    open_tunnels: int = 0
    tunnels: int = 0  # tunnels that reached an upstream
    bytes_to_upstream: int = 0
    bytes_to_client: int = 0
    connect_failures: int = 0  # per address tried (DNS, refused, timeout, TLS handshake)
    refused_limit: int = 0  # max_connections reached (refuse, or queued past queue_timeout)
    refused_rate: int = 0  # connection_rate exceeded
    refused_breaker: int = 0  # breaker open
    idle_timeouts: int = 0
    resets: int = 0  # tunnels ended by a reset or error on either side
    client_handshake_failures: int = 0  # listener-side TLS


@final
class _Tunnel:
    """One relayed connection's state shared by its pumps and idle watchdog."""

    __slots__ = ("broken", "bytes_to_client", "bytes_to_upstream", "idle", "last_active_at", "started_at")

    def __init__(self, now: float) -> None:
        self.started_at = now
        self.last_active_at = now
        self.broken = False
        self.idle = False
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0


@final
class _Connector:
    """The innermost handler under the breaker: `connect` as a `Handler`, so the breaker stage
    (pybreaker state machine, half-open probe limit, volume guard) guards connects exactly as
    it guards HTTP attempts. The opened stream waits in `opened` for the relay to take it;
    the response's `release` closes it if the breaker drops the result."""

    def __init__(self, server: RelayServer) -> None:
        self._server = server
        self.opened: dict[int, trio.abc.Stream] = {}

    async def __call__(self, request: Request) -> Response:
        stream = await self._server.connect_any()
        key = id(request)
        self.opened[key] = stream

        def release() -> None:
            leftover = self.opened.pop(key, None)
            if leftover is not None:
                _abort(leftover)

        return Response(status=200, headers=[], release=release)


@final
class RelayServer:
    """Serves one tcp listener; `handle_connection` is given to `trio.serve_listeners`."""

    def __init__(self, config: ListenerConfig, resolver: Resolver | None = None) -> None:
        assert config.relay is not None, "a tcp listener has a relay section"
        self.config = config
        self._resolver = resolver or Resolver()  # the app passes its one shared resolver
        self.relay: RelayConfig = config.relay
        relay = self.relay
        self.stats = RelayStats()
        self._client_ssl: ssl.SSLContext | None = None
        if any(url.scheme == "tls" for url in relay.upstreams):
            self._client_ssl = client_context(relay.tls, alpn=())
        self._server_ssl = server_context(config.tls) if config.tls is not None else None
        self._slots = trio.Semaphore(relay.max_connections)
        self._rate = ConnectionRate(*relay.connection_rate) if relay.connection_rate else None
        self._next = 0  # round-robin position
        self._connector = _Connector(self)
        self.breaker: BreakerStage | None = None
        connect: Handler = self._connector
        if relay.breaker.enabled:
            self.breaker = BreakerStage(self._connector, relay.breaker, name=f"tcp:{config.name}")
            connect = self.breaker
        self._connect: Handler = connect
        self._log_throttle = LogThrottle()

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            if self._rate is not None and not self._rate.try_take(trio.current_time()):
                self.stats.refused_rate += 1
                self._warn("rate", "connection rate %s exceeded, refusing", _rate_text(self.relay))
                return
            if not await self._take_slot():
                self.stats.refused_limit += 1
                self._warn(
                    "limit",
                    "%d connections open%s, refusing",
                    self.relay.max_connections,
                    f" for {self.relay.queue_timeout_s:g}s" if self.relay.on_limit == "queue" else "",
                )
                return
            try:
                self.stats.open_tunnels += 1
                await self._serve(stream)
            finally:
                self.stats.open_tunnels -= 1
                self._slots.release()
        finally:
            stream.socket.close()

    async def _take_slot(self) -> bool:
        try:
            self._slots.acquire_nowait()
            return True
        except trio.WouldBlock:
            if self.relay.on_limit == "refuse":
                return False
        with trio.move_on_after(self.relay.queue_timeout_s):
            await self._slots.acquire()
            return True
        return False

    async def _serve(self, stream: trio.SocketStream) -> None:
        downstream: trio.abc.Stream = stream
        if self._server_ssl is not None:
            tls = trio.SSLStream(stream, self._server_ssl, server_side=True, https_compatible=True)
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                try:
                    await tls.do_handshake()
                except trio.BrokenResourceError as exc:
                    self.stats.client_handshake_failures += 1
                    self._warn("client-tls", "client TLS handshake failed: %s", _tls_detail(exc))
                    return
                downstream = tls
            if downstream is stream:
                self.stats.client_handshake_failures += 1
                self._warn("client-tls", "client TLS handshake not done within %gs", HANDSHAKE_TIMEOUT_S)
                return
        request = Request(method=b"CONNECT", target=b"", headers=[], client_ip=_peer_ip(stream))
        try:
            response = await self._connect(request)
        except BreakerOpen as exc:
            self.stats.refused_breaker += 1
            self._warn("breaker", "%s; refusing", exc.message)
            return
        except ProxyError as exc:
            self._warn("connect", "%s", exc.message)
            return
        upstream = self._connector.opened.pop(id(request))
        response.release()  # nothing left in `opened`: a no-op kept for symmetry
        self.stats.tunnels += 1
        try:
            await self._pump_both(downstream, upstream)
        finally:
            _abort(upstream)

    async def connect_any(self) -> trio.abc.Stream:
        """A connected (and, for tls://, handshaken) stream to the first address that works,
        in configured order or round-robin; the last error if none does."""
        addresses = self.relay.upstreams
        start = 0
        if self.relay.balance == "round_robin":
            start = self._next % len(addresses)
            self._next += 1
        last: UpstreamError | None = None
        for i in range(len(addresses)):
            url = addresses[(start + i) % len(addresses)]
            try:
                return await self._connect_one(url)
            except UpstreamError as exc:
                self.stats.connect_failures += 1
                if len(addresses) > 1:
                    self._warn(("address", str(url)), "%s; trying the next address", exc.message)
                last = exc
        assert last is not None
        raise last

    async def _connect_one(self, url: UpstreamURL) -> trio.abc.Stream:
        name = f"tcp:{self.config.name}"
        timeout_s = self.relay.connect_timeout_s
        try:
            with trio.fail_after(timeout_s):
                # DNS (cached, see net.resolver) and a connect through the answer's addresses.
                tcp = await self._resolver.connect(url.host, url.port, upstream=name)
                if self._client_ssl is None or url.scheme != "tls":
                    return tcp
                return await self._originate_tls(tcp, url)
        except trio.TooSlowError:
            raise UpstreamConnectTimeout(
                f"connect to {url} timed out after {timeout_s:g}s", upstream=name
            ) from None

    async def _originate_tls(self, tcp: trio.SocketStream, url: UpstreamURL) -> trio.abc.Stream:
        assert self._client_ssl is not None
        server_name = self.relay.tls.server_name or url.host
        tls = trio.SSLStream(tcp, self._client_ssl, server_hostname=server_name, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            tcp.socket.close()
            raise UpstreamTLSError(
                f"TLS handshake with {url} (name {server_name}) failed: {_tls_detail(exc)}",
                upstream=f"tcp:{self.config.name}",
            ) from exc
        except BaseException:
            tcp.socket.close()
            raise
        return tls

    async def _pump_both(self, downstream: trio.abc.Stream, upstream: trio.abc.Stream) -> None:
        tunnel = _Tunnel(trio.current_time())
        async with trio.open_nursery() as watch:
            watch.start_soon(self._idle_watchdog, tunnel, watch.cancel_scope)
            # Plain sockets on both sides take the fast path (see _pump_sockets).
            pump = (
                self._pump_sockets
                if isinstance(downstream, trio.SocketStream) and isinstance(upstream, trio.SocketStream)
                else self._pump
            )
            async with trio.open_nursery() as pumps:
                pumps.start_soon(pump, downstream, upstream, tunnel, pumps.cancel_scope, True)
                pumps.start_soon(pump, upstream, downstream, tunnel, pumps.cancel_scope, False)
            watch.cancel_scope.cancel()
        how = "reset" if tunnel.broken else "idle" if tunnel.idle else "done"
        log.debug(
            "listener %s: tunnel closed (%s) after %.3fs: %d bytes to upstream, %d to client",
            self.config.name,
            how,
            trio.current_time() - tunnel.started_at,
            tunnel.bytes_to_upstream,
            tunnel.bytes_to_client,
        )
        if tunnel.broken:
            self.stats.resets += 1
            # Pass the reset on: the side that did not break learns the tunnel did not end cleanly.
            _abort(downstream)
            return
        for stream in (upstream, downstream):  # both done, or idle: a clean close
            await _close_tls(stream)

    async def _pump(
        self,
        src: trio.abc.Stream,
        dst: trio.abc.Stream,
        tunnel: _Tunnel,
        pumps: trio.CancelScope,
        to_upstream: bool,
    ) -> None:
        try:
            while True:
                data = await src.receive_some(CHUNK_BYTES)
                if not data:
                    break
                tunnel.last_active_at = trio.current_time()
                await dst.send_all(data)
                self._count(tunnel, len(data), to_upstream)
            if isinstance(dst, trio.abc.HalfCloseableStream):
                await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            tunnel.broken = True
            pumps.cancel()

    async def _pump_sockets(
        self,
        src: trio.abc.Stream,
        dst: trio.abc.Stream,
        tunnel: _Tunnel,
        pumps: trio.CancelScope,
        to_upstream: bool,
    ) -> None:
        """`_pump` for two plain sockets, on their non-blocking file descriptors: it waits for
        readiness only when a read or write would block, instead of the two scheduler trips
        that every successful trio socket call makes. In the profile of small keep-alive
        exchanges the trio socket wrappers cost more than the system calls; this path halves
        the CPU per GB of a bulk transfer and costs less per small exchange (bench/README.md).
        A checkpoint every YIELD_EVERY full chunks keeps a flooding peer from starving other
        tunnels (and lets cancellation in)."""
        assert isinstance(src, trio.SocketStream)
        assert isinstance(dst, trio.SocketStream)
        src_fd, dst_fd = src.socket.fileno(), dst.socket.fileno()
        since_yield = 0
        pipe: tuple[int, int] | None = None
        try:
            while True:
                if pipe is not None:
                    size = await _splice_chunk(src_fd, dst_fd, pipe)
                    if not size:
                        break
                    tunnel.last_active_at = trio.current_time()
                    self._count(tunnel, size, to_upstream)
                    since_yield += 1
                    if since_yield >= YIELD_EVERY:
                        await trio.lowlevel.checkpoint()
                        since_yield = 0
                    continue
                try:
                    data = os.read(src_fd, CHUNK_BYTES)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(src_fd)
                    since_yield = 0
                    continue
                if not data:
                    break
                tunnel.last_active_at = trio.current_time()
                size = len(data)
                written = sockio.send_nowait(dst_fd, data)
                if written < size:
                    await sockio.send_all(dst_fd, data, written)  # back-pressure
                    since_yield = 0
                self._count(tunnel, size, to_upstream)
                if size < CHUNK_BYTES:
                    # A short read emptied the socket buffer: the next read would almost surely
                    # be EAGAIN, so wait first (level-triggered: bytes that came since count).
                    await trio.lowlevel.wait_readable(src_fd)
                    since_yield = 0
                    continue
                if SPLICE:  # a full chunk: a bulk transfer, worth a pipe to splice through
                    pipe = _open_pipe()
                since_yield += 1
                if since_yield >= YIELD_EVERY:
                    await trio.lowlevel.checkpoint()
                    since_yield = 0
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            tunnel.broken = True
            pumps.cancel()
        finally:
            if pipe is not None:
                os.close(pipe[0])
                os.close(pipe[1])

    def _count(self, tunnel: _Tunnel, size: int, to_upstream: bool) -> None:
        if to_upstream:
            self.stats.bytes_to_upstream += size
            tunnel.bytes_to_upstream += size
        else:
            self.stats.bytes_to_client += size
            tunnel.bytes_to_client += size

    async def _idle_watchdog(self, tunnel: _Tunnel, scope: trio.CancelScope) -> None:
        idle_s = self.relay.idle_timeout_s
        while True:
            deadline = tunnel.last_active_at + idle_s
            if trio.current_time() >= deadline:
                self.stats.idle_timeouts += 1
                tunnel.idle = True
                log.info("listener %s: tunnel idle for %gs, closing it", self.config.name, idle_s)
                scope.cancel()
                return
            await trio.sleep_until(deadline)

    def _warn(self, key: object, message: str, *args: object) -> None:
        suppressed = self._log_throttle.allow(key, trio.current_time())
        if suppressed is None:
            return
        more = f" ({suppressed} more since the last line)" if suppressed else ""
        log.warning("listener %s: " + message + more, self.config.name, *args)


def _open_pipe() -> tuple[int, int] | None:
    """A non-blocking pipe for splice, or None (out of file descriptors: keep copying)."""
    try:
        return os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


async def _splice_chunk(src_fd: int, dst_fd: int, pipe: tuple[int, int]) -> int:
    """Move up to a chunk from src to dst through `pipe` inside the kernel (no copy into
    Python); the bytes moved, 0 at EOF. The pipe is empty between calls, so EAGAIN on the way
    in means no data yet, and on the way out a full socket buffer (back-pressure)."""
    pipe_r, pipe_w = pipe
    while True:
        try:
            moved = os.splice(src_fd, pipe_w, CHUNK_BYTES, flags=_SPLICE_FLAGS)
            break
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src_fd)
    left = moved
    while left:
        try:
            left -= os.splice(pipe_r, dst_fd, left, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(dst_fd)
    return moved


def _rate_text(relay: RelayConfig) -> str:
    assert relay.connection_rate is not None
    count, per_s = relay.connection_rate
    return f"{count:g}/{per_s:g}s"


def _peer_ip(stream: trio.SocketStream) -> bytes:
    try:
        return str(stream.socket.getpeername()[0]).encode()
    except OSError:
        return b""


def _tls_detail(exc: BaseException) -> str:
    cause = exc.__cause__
    detail = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
    return str(detail or cause or "connection lost")


def _raw_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


def _abort(stream: trio.abc.Stream) -> None:
    """Close at once; if the socket is still open, with a reset (SO_LINGER 0)."""
    sock = _raw_socket(stream)
    if sock is None:
        return
    if sock.fileno() != -1:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


async def _close_tls(stream: trio.abc.Stream) -> None:
    """After a clean end: a TLS side gets its close_notify (bounded), then the socket closes."""
    if isinstance(stream, trio.SSLStream):
        with trio.move_on_after(TLS_CLOSE_S):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()
    sock = _raw_socket(stream)
    if sock is not None:
        sock.close()
