"""Bulk-transfer upstream for bench/relay.py: a sink and a source, one thread per connection.

Each connection starts with 9 bytes: `U` + 8 ignored bytes (upload: everything after is read
and discarded until EOF, then the byte count goes back as 8 big-endian bytes), or `D` + a
big-endian 64-bit size (download: that many bytes are sent, then the connection closes).
Blocking sockets and 1 MiB buffers: the stdlib at its cheapest, so this is never the bottleneck.

Usage: bulk_upstream.py --listen PORT [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
import threading
from types import FrameType

BUFFER_BYTES = 1 << 20
PAYLOAD = bytes(range(256)) * (BUFFER_BYTES // 256)


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed before the command")
        data += chunk
    return data


def handle(conn: socket.socket) -> None:
    with conn:
        try:
            command = _recv_exactly(conn, 9)
            if command[:1] == b"U":
                buffer = bytearray(BUFFER_BYTES)
                total = 0
                while n := conn.recv_into(buffer):
                    total += n
                conn.sendall(struct.pack(">Q", total))
            elif command[:1] == b"D":
                (left,) = struct.unpack(">Q", command[1:])
                view = memoryview(PAYLOAD)
                while left > 0:
                    step = min(left, BUFFER_BYTES)
                    conn.sendall(view[:step])
                    left -= step
        except OSError:
            return


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    with socket.create_server((args.host, args.listen), backlog=128) as server:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
