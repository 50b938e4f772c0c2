"""Secret canaries: one place that knows every sink a credential could leak into and how to
scan it (responses, log records, the access log, spans, metrics, admin endpoints, Redis).

`Canary` makes unique credential values (one from the environment, one from a file), the
resolver and the header/query templates that inject them, and a `SecretScan` for them. Tests
with their own fixed secrets use `SecretScan(value, ...)` directly. A scan looks for each value
as sent and base64-encoded (as in a Basic credential); a hash of it (a cache or rate-limit
key) is fine and is not looked for.
"""

from __future__ import annotations

import base64
import logging
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import final

import redis
from opentelemetry.sdk.trace import ReadableSpan

from resilient_ambassador.core.templates import Template, parse_template
from resilient_ambassador.secrets import SecretResolver
from tests.support.client import ClientResponse, http_request

# Every admin endpoint that returns a document (404s are fine: /metrics needs telemetry).
ADMIN_PATHS = ("/config", "/stats", "/metrics", "/healthz", "/readyz")
_LOG_FORMAT = logging.Formatter("%(levelname)s %(name)s %(message)s")


@final
class SecretScan:
    """Asserts that none of `values` appears in whatever it is shown."""

    def __init__(self, *values: str) -> None:
        assert values, "nothing to look for"
        assert all(len(v) >= 8 for v in values), "canaries must be long enough to be unique"
        self.values = values
        self._needles = [n for v in values for n in (v.encode(), base64.b64encode(v.encode()))]

    def found_in(self, data: bytes | str) -> bool:
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        return any(needle in raw for needle in self._needles)

    def absent(self, where: str, data: bytes | str) -> None:
        assert not self.found_in(data), f"a secret leaked into {where}: {_excerpt(data, self._needles)}"

    def response(self, response: ClientResponse, where: str = "a response") -> None:
        """Status line aside, everything the client got: header names and values, and the body."""
        self.headers(response, where)
        self.absent(f"{where}'s body", response.body)

    def headers(self, response: ClientResponse, where: str = "a response") -> None:
        self.absent(f"{where}'s headers", b"\n".join(n + b": " + v for n, v in response.headers))

    def log_records(self, records: Iterable[logging.LogRecord]) -> int:
        """Each record formatted as a handler would (message, arguments, traceback); returns
        how many were scanned."""
        count = 0
        for record in records:
            self.absent(f"log record {record.name}:{record.lineno}", _LOG_FORMAT.format(record))
            count += 1
        return count

    def spans(self, spans: Iterable[ReadableSpan]) -> int:
        """Names, attributes, events, links, status and resource of every span."""
        dumped = [s.to_json() for s in spans]
        self.absent("a span", "\n".join(dumped))
        return len(dumped)

    async def admin(self, port: int) -> dict[str, bytes]:
        """GET every admin endpoint; returns the bodies of those that answered 200."""
        bodies: dict[str, bytes] = {}
        for path in ADMIN_PATHS:
            response = await http_request(port, "GET", path)
            self.response(response, f"admin {path}")
            if response.status == 200:
                bodies[path] = response.body
        return bodies

    def redis_keys(self, url: str, prefix: str) -> int:
        """SCAN every key under `prefix`: the key, its DUMP and its readable contents (DUMP
        may LZF-compress a long string, so the plain value is read too). Returns the number
        of keys scanned, so a caller can tell the scan was not vacuous."""
        assert prefix, "scan a test's own prefix, never the whole shared Redis"
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            count = 0
            for key in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
                count += 1
                self.absent("a Redis key", key)
                self.absent(f"Redis DUMP of {key!r}", client.dump(key) or b"")
                self.absent(f"Redis value of {key!r}", _contents(client, key))
            return count
        finally:
            client.close()


@final
class Canary:
    """Unique secrets for one test: `env_value` as ${API_KEY} and `file_value` as ${file:...}
    (inject them with `headers` and `query`, resolve with `resolver()`; `rotate()` replaces
    the file's value as Kubernetes does), and `redis_password` for a Redis URL. `scan` looks
    for all of them, rotated-out values included."""

    def __init__(self, directory: Path) -> None:
        self.env_value = f"canary-env-{secrets.token_hex(8)}"
        self.file_value = f"canary-file-{secrets.token_hex(8)}"
        self.redis_password = f"canary-redis-{secrets.token_hex(8)}"
        self.file = directory / "api-token"
        self._values = [self.env_value, self.file_value, self.redis_password]
        self._write(self.file_value)

    @property
    def scan(self) -> SecretScan:
        return SecretScan(*self._values)

    def resolver(self) -> SecretResolver:
        """Re-reads the file on every use, so a rotation shows at once."""
        return SecretResolver(environ={"API_KEY": self.env_value}, recheck_interval_s=0.0)

    def rotate(self) -> str:
        self.file_value = f"canary-rotated-{secrets.token_hex(8)}"
        self._values.append(self.file_value)
        self._write(self.file_value)
        return self.file_value

    @property
    def headers(self) -> tuple[tuple[str, Template], ...]:
        return (("X-Api-Key", parse_template("${API_KEY}")),)

    @property
    def query(self) -> tuple[tuple[str, Template], ...]:
        return (("api_key", parse_template(f"${{file:{self.file}}}")),)

    def _write(self, value: str) -> None:
        # Replaced atomically (a new inode), with a trailing newline, as a mounted Secret is.
        staged = self.file.with_suffix(".new")
        staged.write_text(value + "\n")
        staged.replace(self.file)


def _contents(client: redis.Redis, key: bytes) -> bytes:
    kind = client.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind == "string":
        value = client.get(key)
        return value if isinstance(value, bytes) else b""
    if kind == "set":
        return b"\n".join(sorted(client.smembers(key)))  # type: ignore[arg-type]
    if kind == "zset":
        return b"\n".join(client.zrange(key, 0, -1))  # type: ignore[arg-type]
    if kind == "hash":
        fields: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
        return b"\n".join(k + b"=" + v for k, v in sorted(fields.items()))
    if kind == "list":
        return b"\n".join(client.lrange(key, 0, -1))  # type: ignore[arg-type]
    return b""  # gone meanwhile (expired): nothing to read


def _glob_escape(prefix: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix)


def _excerpt(data: bytes | str, needles: list[bytes]) -> str:
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    at = min((raw.find(n) for n in needles if n in raw), default=0)
    return repr(raw[max(0, at - 80) : at + 80])
