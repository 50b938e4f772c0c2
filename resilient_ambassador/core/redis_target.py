"""Which Redis a `redis.url` names: one server, a Sentinel-managed master, or a Cluster.

Pure parsing (stdlib only): `stores.redis_client` turns a `RedisTarget` into a redis-py client,
`config_loader` uses the same parser so a bad URL is a config error with the key's line.

Schemes (docs/redis-topologies.md):

- `redis://`, `rediss://` (TLS), `unix://`: one server; redis-py reads the URL itself.
- `sentinel://[[user]:password@]host:port[,host:port...]/master-name[/db]`: ask the
  Sentinels for the master called `master-name`. The password is the master's; Sentinels
  are asked without one.
- `redis+cluster://[[user]:password@]host:port[,host:port...]` (and `rediss+cluster://` for
  TLS): a Redis Cluster; the hosts are seeds, the client learns the rest from them.

Error messages never repeat the URL: it may hold a password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, final
from urllib.parse import unquote

RedisMode = Literal["single", "sentinel", "cluster"]

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "sentinel"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
TLS_SCHEMES = ("rediss", "rediss+cluster")
SCHEMES = (*SINGLE_SCHEMES, SENTINEL_SCHEME, *CLUSTER_SCHEMES)
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


@final
@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed `redis.url`. `url` is the original text (redis-py parses single-server URLs
    itself); `nodes` are the Sentinels or the Cluster seeds."""

    mode: RedisMode
    url: str
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None  # Sentinel: the master's name
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_redis_target(url: str) -> RedisTarget:
    """The target `url` names, or ValueError saying what is wrong (without the URL)."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            "expected a URL like redis://redis:6379/0, rediss://..., "
            "sentinel://host:26379/master-name or redis+cluster://host:6379"
        )
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("single", url, tls=scheme == "rediss")
    authority, _, path = rest.partition("/")
    if "?" in path or "#" in path or "?" in authority or "#" in authority:
        raise ValueError(f"a {scheme}:// URL takes no query or fragment (the config has keys for that)")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    default_port = DEFAULT_SENTINEL_PORT if scheme == SENTINEL_SCHEME else DEFAULT_PORT
    nodes = tuple(_host_port(item, default_port) for item in hosts.split(","))
    parts = [p for p in path.split("/") if p]
    if scheme == SENTINEL_SCHEME:
        if not parts or len(parts) > 2:
            raise ValueError("expected sentinel://host:26379[,host:26379]/master-name[/db]")
        db = _db(parts[1]) if len(parts) == 2 else 0
        return RedisTarget("sentinel", url, False, nodes, unquote(parts[0]), db, username, password)
    if parts not in ([], ["0"]):
        raise ValueError("a Redis Cluster has database 0 only: expected redis+cluster://host:6379")
    return RedisTarget("cluster", url, scheme in TLS_SCHEMES, nodes, None, 0, username, password)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    if not item:
        raise ValueError("expected host:port[,host:port...] after the scheme")
    if item.startswith("["):  # [::1]:6379
        host, bracket, tail = item[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError("expected [ipv6]:port")
        port_text = tail[1:]
    else:
        host, colon, port_text = item.rpartition(":")
        if not colon:
            host, port_text = item, ""
    if not host:
        raise ValueError("expected host:port[,host:port...] after the scheme")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError("a port is a number from 1 to 65535")
    return host, int(port_text)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError("the database is a number, like /0")
    return int(text)
