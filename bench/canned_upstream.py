"""Fallback benchmark upstream, used when shared/bench-reference/ is not beside the repo.

For every request head it sees (bodiless requests only: it never parses a body) it writes one
canned 200 response with a `content-length` body of --size bytes. There is no HTTP parser, so
the upstream is never the bottleneck and never the thing being measured. Not a real server.

With --certfile and --keyfile it speaks TLS (the harness's TLS-upstream scenario).

Usage: canned_upstream.py --listen PORT [--host 127.0.0.1] [--size 1024] [--certfile C --keyfile K]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
from typing import final

HEAD_END = b"\r\n\r\n"
# A client that sends this much without a blank line is not a benchmark client: drop it.
MAX_PENDING_BYTES = 1 << 20


def make_body(size_bytes: int) -> bytes:
    """A JSON body of exactly `size_bytes` (11 at the least: the empty `{"data":""}`)."""
    filler = max(size_bytes - len(b'{"data":""}'), 0)
    return b'{"data":"' + b"x" * filler + b'"}'


def make_response(size_bytes: int) -> bytes:
    body = make_body(size_bytes)
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + HEAD_END
    )
    return head + body


@final
class CannedProtocol(asyncio.Protocol):
    """Answers each request head with the canned response; pipelined heads get one each."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._pending = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport  # asyncio sets TCP_NODELAY on TCP transports

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        pending = self._pending + data if self._pending else data
        heads = pending.count(HEAD_END)
        if heads:
            self._pending = pending[pending.rfind(HEAD_END) + len(HEAD_END) :]
            self._transport.write(self._response * heads)
        else:
            self._pending = pending
        if len(self._pending) > MAX_PENDING_BYTES:
            self._transport.close()


async def serve(host: str, port: int, size_bytes: int, tls: ssl.SSLContext | None = None) -> None:
    response = make_response(size_bytes)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: CannedProtocol(response), host, port, backlog=4096, ssl=tls)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--listen", type=int, required=True, metavar="PORT")
    parser.add_argument("--size", type=int, default=1024, help="body size in bytes (default 1024)")
    parser.add_argument("--certfile", help="PEM certificate chain: serve TLS (with --keyfile)")
    parser.add_argument("--keyfile", help="PEM private key of --certfile")
    args = parser.parse_args()
    tls = None
    if args.certfile or args.keyfile:
        if not (args.certfile and args.keyfile):
            parser.error("--certfile and --keyfile go together")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.certfile, args.keyfile)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.listen, args.size, tls))


if __name__ == "__main__":
    main()
