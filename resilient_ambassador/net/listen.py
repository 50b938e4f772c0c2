"""Listening sockets: trio's `open_tcp_listeners`, plus SO_REUSEPORT for `--workers`.

With SO_REUSEPORT every worker process binds the same address and the kernel spreads new
connections across their accept queues, so workers share no socket and no lock, and a worker
that dies takes only its own queue with it. Without it, this is `open_tcp_listeners` as is.
"""

from __future__ import annotations

import errno
import socket

import trio


async def open_listeners(
    host: str, port: int, *, backlog: int, reuse_port: bool = False
) -> list[trio.SocketListener]:
    if not reuse_port:
        return await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    addresses = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _, sockaddr in addresses:
            try:
                sock = trio.socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue  # as trio does: an IPv6 address on an IPv4-only host
                raise
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        raise OSError(errno.EAFNOSUPPORT, f"no usable address family for {host}")
    return listeners
