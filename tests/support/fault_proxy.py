"""An in-process TCP fault proxy (Toxiproxy's toxics, in trio): put it between the daemon and a
fake upstream, or between a client and the daemon, and switch faults on and off at runtime.

Toxiproxy and `tc netem` cannot be installed here, and a fault at the TCP layer is what the
daemon meets in production: a reset mid-body, a peer that goes silent, a slow link. Each
direction has its own `Faults`, read afresh for every chunk, so a test can change them while
connections are open:

    proxy = await start_fault_proxy(nursery, "127.0.0.1", upstream.port)
    proxy.downstream.latency_s = 0.5           # target -> client answers arrive late
    proxy.downstream.reset_after_bytes = 100   # then RST both sides mid-response
    proxy.blackhole = True                     # new connections: accepted, never answered

`upstream` is the client -> target direction, `downstream` the target -> client one (Toxiproxy's
naming). Jitter comes from a seeded `random.Random`, so runs repeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal, final

import trio

_READ_SIZE_BYTES = 64 * 1024

Direction = Literal["upstream", "downstream"]


@final
@dataclass(slots=True)
class Faults:
    """What happens to bytes flowing in one direction. All off by default."""

    latency_s: float = 0.0  # each chunk is held this long before it is forwarded
    jitter_s: float = 0.0  # plus a uniform extra in [-jitter_s, +jitter_s] (never below 0)
    bandwidth_bytes_per_s: float | None = None  # forwarded at most this fast
    # Split each chunk into pieces of this size, `slice_delay_s` apart (a peer that drips).
    slice_bytes: int | None = None
    slice_delay_s: float = 0.0
    # After this many bytes in this direction (per connection): reset both sides, SO_LINGER 0.
    reset_after_bytes: int | None = None
    # After this many bytes in this direction (per connection): close both sides politely (FIN).
    limit_bytes: int | None = None
    blackhole: bool = False  # read and discard: the bytes never arrive, nothing is closed

    def clear(self) -> None:
        """Switch every fault off."""
        for spec in dataclasses.fields(Faults):
            setattr(self, spec.name, spec.default)


@final
@dataclass(slots=True)
class ProxiedConnection:
    """One accepted connection and what went through it. Mutated while it lives."""

    id: int
    bytes_up: int = 0  # client -> target, forwarded
    bytes_down: int = 0  # target -> client, forwarded
    connected: bool = False  # the target side was opened (never, when blackholed)
    ending: str | None = None  # "closed", "reset", "limit", "target_refused", "blackhole"
    closed: trio.Event = field(default_factory=trio.Event)


class _Cut(Exception):
    """A fault ends the connection: `reset` picks RST over FIN."""

    def __init__(self, reset: bool) -> None:
        super().__init__()
        self.reset = reset


@final
class FaultProxy:
    """The proxy. Build it with `start_fault_proxy`; change its faults from tests at any time."""

    def __init__(self, target_host: str, target_port: int, *, seed: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self.port = 0  # set once listening
        self.upstream = Faults()
        self.downstream = Faults()
        # New connections are accepted and read, but never connected to the target nor answered.
        self.blackhole = False
        self.connections: list[ProxiedConnection] = []
        self._random = random.Random(seed)
        self._live: dict[int, trio.CancelScope] = {}
        self._resets: set[int] = set()

    # -- what tests call --------------------------------------------------------------------

    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._live)

    def clear(self) -> None:
        """Every fault off (connections already open keep flowing normally)."""
        self.upstream.clear()
        self.downstream.clear()
        self.blackhole = False

    def faults(self, direction: Direction) -> Faults:
        return self.upstream if direction == "upstream" else self.downstream

    def cut_all(self, *, reset: bool = True) -> int:
        """End every open connection now (RST, or FIN with `reset=False`); return how many."""
        for conn_id, scope in self._live.items():
            if reset:
                self._resets.add(conn_id)
            scope.cancel()
        return len(self._live)

    # -- server -----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        for extra in listeners[1:]:
            await extra.aclose()
        listener = listeners[0]
        async with listener, trio.open_nursery() as nursery:
            self.port = listener.socket.getsockname()[1]
            task_status.started()
            while True:
                client = await listener.accept()
                conn = ProxiedConnection(id=len(self.connections))
                self.connections.append(conn)
                scope = trio.CancelScope()
                self._live[conn.id] = scope
                nursery.start_soon(self._handle, conn, client, scope)

    async def _handle(
        self, conn: ProxiedConnection, client: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        target: trio.SocketStream | None = None
        reset = False
        try:
            with scope:
                if self.blackhole:
                    conn.ending = "blackhole"
                    await _swallow(client)
                    return
                try:
                    target = await trio.open_tcp_stream(self.target_host, self.target_port)
                except OSError:
                    conn.ending, reset = "target_refused", True  # as a refused port looks: RST
                    return
                conn.connected = True
                try:
                    async with trio.open_nursery() as pumps:
                        pumps.start_soon(self._pump, conn, client, target, "upstream")
                        pumps.start_soon(self._pump, conn, target, client, "downstream")
                except* _Cut as group:
                    cut = group.exceptions[0]
                    assert isinstance(cut, _Cut)
                    reset = cut.reset
                    conn.ending = "reset" if reset else "limit"
                else:
                    conn.ending = "closed"
            if scope.cancelled_caught:
                reset = conn.id in self._resets
                conn.ending = "reset" if reset else "closed"
        finally:
            del self._live[conn.id]
            for stream in (client, target):
                if stream is not None:
                    _close(stream, reset=reset)
            conn.closed.set()

    async def _pump(
        self, conn: ProxiedConnection, src: trio.SocketStream, dst: trio.SocketStream, direction: Direction
    ) -> None:
        while True:
            try:
                data = await src.receive_some(_READ_SIZE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Cut(reset=True) from None  # the peer reset: pass the reset on
            faults = self.faults(direction)
            if not data:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await dst.send_eof()  # half-close, as TCP would carry it
                return
            if faults.blackhole:
                continue
            delay = faults.latency_s + (
                self._random.uniform(-faults.jitter_s, faults.jitter_s) if faults.jitter_s else 0.0
            )
            if delay > 0:
                await trio.sleep(delay)
            await self._forward(conn, dst, data, direction)

    async def _forward(
        self, conn: ProxiedConnection, dst: trio.SocketStream, data: bytes, direction: Direction
    ) -> None:
        faults = self.faults(direction)
        sent = conn.bytes_up if direction == "upstream" else conn.bytes_down
        cut: _Cut | None = None
        for limit, reset in ((faults.reset_after_bytes, True), (faults.limit_bytes, False)):
            if limit is not None and sent + len(data) >= limit:
                data = data[: max(0, limit - sent)]
                cut = cut or _Cut(reset=reset)
        step = faults.slice_bytes or len(data) or 1
        rate = faults.bandwidth_bytes_per_s
        if rate:
            step = min(step, max(1, int(rate / 10)))  # a tenth of a second's worth per write
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step]
            if offset and faults.slice_delay_s:
                await trio.sleep(faults.slice_delay_s)
            if rate:
                await trio.sleep(len(piece) / rate)  # the time the piece takes on the wire
            try:
                await dst.send_all(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Cut(reset=True) from None
            if direction == "upstream":
                conn.bytes_up += len(piece)
            else:
                conn.bytes_down += len(piece)
        if cut is not None:
            raise cut


async def _swallow(stream: trio.SocketStream) -> None:
    """Read and drop everything until the peer goes away."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(_READ_SIZE_BYTES):
            pass


def _close(stream: trio.SocketStream, *, reset: bool) -> None:
    if reset:
        # Abortive close (RFC 9293 3.6): SO_LINGER 0 makes close() send RST, not FIN.
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def start_fault_proxy(
    nursery: trio.Nursery, target_host: str, target_port: int, *, seed: int = 0
) -> FaultProxy:
    """Start a `FaultProxy` to `target_host:target_port`; it is listening when this returns."""
    proxy = FaultProxy(target_host, target_port, seed=seed)
    await nursery.start(proxy.serve)
    return proxy
