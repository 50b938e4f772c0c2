"""Raw TCP (and TLS) upstreams for relay tests, and the config of a tcp listener in front of them."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, final

import trio

from resilient_ambassador.config_loader import parse_relay_address
from resilient_ambassador.core.config import (
    BreakerConfig,
    Config,
    DrainConfig,
    ListenerConfig,
    ListenerTLS,
    RelayConfig,
)
from tests.support.daemon import TEST_ADMIN

StreamHandler = Callable[[trio.abc.Stream], Awaitable[None]]
NO_BREAKER = BreakerConfig(enabled=False)


@final
@dataclass
class TcpUpstream:
    """A loopback server running `handler` per connection (over TLS when given a context)."""

    port: int
    connections: int = 0
    server_names: list[str | None] = field(default_factory=list)  # SNI seen, TLS only

    def address(self, scheme: str = "tcp", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}"


async def start_tcp_upstream(
    nursery: trio.Nursery, handler: StreamHandler, ssl_context: ssl.SSLContext | None = None
) -> TcpUpstream:
    upstream = TcpUpstream(port=0)
    if ssl_context is not None:

        def sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            upstream.server_names.append(name)

        ssl_context.sni_callback = sni

    async def serve(stream: trio.SocketStream) -> None:
        upstream.connections += 1
        wrapped: trio.abc.Stream = stream
        try:
            if ssl_context is not None:
                tls = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
                await tls.do_handshake()
                wrapped = tls
            await handler(wrapped)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            stream.socket.close()

    listeners = await nursery.start(partial_serve_tcp, serve)
    upstream.port = listeners[0].socket.getsockname()[1]
    return upstream


async def partial_serve_tcp(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await trio.serve_tcp(handler, 0, host="127.0.0.1", task_status=task_status)


async def echo(stream: trio.abc.Stream) -> None:
    """Echo until EOF, then half-close (or close, for TLS)."""
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    if isinstance(stream, trio.abc.HalfCloseableStream):
        await stream.send_eof()


def greeter(text: bytes) -> StreamHandler:
    """Send `text` at once, then echo: tells tests which upstream they reached."""

    async def handler(stream: trio.abc.Stream) -> None:
        await stream.send_all(text)
        await echo(stream)

    return handler


def reset(stream: trio.abc.Stream) -> None:
    """Close with RST (SO_LINGER 0)."""
    raw = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    assert isinstance(raw, trio.SocketStream)
    sock = raw.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def tcp_config(
    upstreams: Sequence[str],
    *,
    grace_period_s: float = 5.0,
    listener_tls: ListenerTLS | None = None,
    **relay: Any,
) -> Config:
    """One tcp listener on an ephemeral port relaying to `upstreams`; `relay` sets RelayConfig
    fields (`tls=` is origination); no breaker unless given."""
    relay.setdefault("breaker", NO_BREAKER)
    return Config(
        listeners=(
            ListenerConfig(
                name="tcp",
                host="127.0.0.1",
                port=0,
                protocol="tcp",
                relay=RelayConfig(upstreams=tuple(parse_relay_address(u) for u in upstreams), **relay),
                tls=listener_tls,
            ),
        ),
        upstreams={},
        drain=DrainConfig(grace_period_s=grace_period_s),
        admin=TEST_ADMIN,
    )
