"""Building the validated `Config` from YAML, or from the one-liner flags.

PyYAML's node API (`yaml.compose`) keeps every key's line, so each error reads like
`ambassador.yaml:12: upstreams.tmdb.timeouts.conect: unknown key (expected one of: ...)`.
Scalars are taken as the text written and parsed by our own rules (`core.units`), so YAML 1.1
surprises (`no` meaning false, `1:30` meaning 90, `010` meaning 8) never reach the config.
Secrets are resolved once here, so a missing variable or file is a config error at start-up
(or on reload) rather than a failure on the first request; no message ever contains a value.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, final
from urllib.parse import urlsplit

import yaml

from resilient_ambassador.core.config import (
    FAILURE_ERROR_KINDS,
    AccessLogConfig,
    AdminConfig,
    BreakerConfig,
    CacheStoreConfig,
    ClientLimits,
    Config,
    DNSConfig,
    DrainConfig,
    ListenerConfig,
    ListenerTLS,
    PoolConfig,
    QuotaConfig,
    RateLimitConfig,
    RedisConfig,
    RelayConfig,
    RetryConfig,
    RouteCacheConfig,
    RouteConfig,
    TelemetryConfig,
    TLSConfig,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamURL,
)
from resilient_ambassador.core.headers import HOP_BY_HOP
from resilient_ambassador.core.ratelimit import default_burst
from resilient_ambassador.core.redis_target import parse_redis_target
from resilient_ambassador.core.templates import Template, parse_template
from resilient_ambassador.core.units import parse_duration, parse_rate, parse_size
from resilient_ambassador.net.tls import client_context, server_context
from resilient_ambassador.secrets import SecretError, SecretResolver

_T = TypeVar("_T")
_N = TypeVar("_N", int, float)

_NULL_TAG = "tag:yaml.org,2002:null"
# Names become log fields and metric labels, so keep them plain.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME_RULE = "letters, digits, '.', '_' and '-'"
_LISTEN_FORM = "expected HOST:PORT like 127.0.0.1:8000 or [::1]:8000"
_COUNT_RE = re.compile(r"[0-9]+")
_METHOD_RE = re.compile(r"[A-Z][A-Z0-9_-]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_HOST_PORT_RE = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]+))(?::(?P<port>[0-9]+))?")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # field-name = token, RFC 9110 5.1
_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")  # path-absolute, RFC 3986 3.3
_URL_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f]")  # urlsplit silently drops tabs/newlines

# Hop-by-hop fields are per connection (RFC 9110 7.6.1) and Content-Length is framing (RFC 9112
# 6.2): the proxy sets them itself. Host has its own setting, `host_header`.
_NOT_INJECTABLE = frozenset(name.decode() for name in HOP_BY_HOP) | {"content-length"}
# Policy sections later versions add. Rejected by name so that a config written for a newer
# version fails loudly instead of running without its retries or limits.
_RESERVED = ("cache",)


class ConfigError(Exception):
    """An invalid config, as `source:line: key.path: problem`. Never contains a secret value."""


@contextmanager
def _reported(where: str) -> Iterator[None]:
    """Turn a parser's `ValueError` or `SecretError` into a `ConfigError` saying where."""
    try:
        yield
    except (ValueError, SecretError) as e:
        raise ConfigError(f"{where} {e}") from None


@final
@dataclass(frozen=True, slots=True)
class _At:
    """A YAML node and where it is (source, line, key path), so every check can say so."""

    source: str
    line: int
    path: str
    node: yaml.Node

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}: {self.path}:" if self.path else f"{self.source}:{self.line}:"

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where} {message}")

    def key(self, key: str, line: int, node: yaml.Node) -> _At:
        return _At(self.source, line, f"{self.path}.{key}" if self.path else key, node)

    def entries(self) -> list[tuple[str, _At]]:
        """A mapping's entries in order, each at its key's line. PyYAML would silently keep
        the last of two equal keys; we refuse them."""
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {_kind(self.node)}")
        first_line: dict[str, int] = {}
        out: list[tuple[str, _At]] = []
        for key_node, value_node in self.node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise _At(self.source, line, self.path, key_node).error("keys must be strings")
            key = str(key_node.value)
            at = self.key(key, line, value_node)
            if key in first_line:
                raise at.error(f"duplicate key (first at line {first_line[key]})")
            first_line[key] = line
            out.append((key, at))
        return out

    def fields(
        self, allowed: tuple[str, ...], required: tuple[str, ...] = (), *, policies: bool = False
    ) -> dict[str, _At]:
        """A mapping with a fixed set of keys; `policies` marks where `_RESERVED` keys belong."""
        found = dict(self.entries())
        for key, at in found.items():
            if policies and key in _RESERVED and key not in allowed:
                raise at.error(f"{key} is not implemented in this version yet")
            if key not in allowed:
                raise at.error(f"unknown key (expected one of: {', '.join(allowed)})")
        for key in required:
            if key not in found:
                raise self.key(key, self.line, self.node).error("missing required key")
        return found

    def items(self) -> list[_At]:
        """A non-empty list's items, each at its own line."""
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got {_kind(self.node)}")
        if not self.node.value:
            raise self.error("expected a non-empty list")
        return [
            _At(self.source, item.start_mark.line + 1, f"{self.path}[{i}]", item)
            for i, item in enumerate(self.node.value)
        ]

    def text(self, expected: str = "a string") -> str:
        if not isinstance(self.node, yaml.ScalarNode) or self.node.tag == _NULL_TAG:
            raise self.error(f"expected {expected}, got {_kind(self.node)}")
        return str(self.node.value)

    def parsed(self, parse: Callable[[str], _T], expected: str) -> _T:
        text = self.text(expected)
        with _reported(self.where):
            return parse(text)

    def name(self) -> str:
        name = self.text()
        if not _NAME_RE.fullmatch(name):
            raise self.error(f"expected a name of {_NAME_RULE}")
        return name

    def choice(self, *choices: str) -> str:
        value = self.text()
        if value not in choices:
            raise self.error(f"expected one of: {', '.join(choices)}")
        return value

    def boolean(self) -> bool:
        return self.choice("true", "false") == "true"

    def duration(self) -> float:
        return self._positive(self.parsed(parse_duration, "a duration like 250ms, 2s, 5m"))

    def size(self) -> int:
        return self._positive(self.parsed(parse_size, "a size like 64KiB, 1MiB"))

    def count(self) -> int:
        return self._positive(self.parsed(_parse_count, "a whole number"))

    def whole_number(self) -> int:
        """A count that may be 0 (e.g. `retries: 0` turns retries off)."""
        return self.parsed(_parse_count, "a whole number")

    def ratio(self) -> float:
        """A share: `0.2` or `20%`."""
        return self.parsed(_parse_ratio, "a ratio like 0.2 or 20%")

    def statuses(self) -> frozenset[int]:
        """A list of HTTP status codes (100-599)."""
        out: set[int] = set()
        for item in self.items():
            code = item.parsed(_parse_count, "a status code")
            if not 100 <= code <= 599:
                raise item.error("expected a status code between 100 and 599")
            out.add(code)
        return frozenset(out)

    def methods(self) -> frozenset[str]:
        """A list of request methods, upper-case tokens such as GET."""
        out: set[str] = set()
        for item in self.items():
            method = item.text()
            if not _METHOD_RE.fullmatch(method):
                raise item.error("expected an upper-case method such as GET")
            out.add(method)
        return frozenset(out)

    def header_names(self) -> tuple[str, ...]:
        """A list of header field names, lower-cased, duplicates refused."""
        out: list[str] = []
        for item in self.items():
            name = item.header_name()
            if name in out:
                raise item.error(f"{name} is listed twice")
            out.append(name)
        return tuple(out)

    def header_name(self) -> str:
        name = self.text()
        with _reported(self.where):
            _check_header_name(name)
        return name.lower()

    def path_prefix(self) -> str:
        prefix = self.text()
        if not _PATH_RE.fullmatch(prefix):
            raise self.error("expected a path starting with /")
        return prefix

    def route_host(self) -> str:
        host = self.text()
        if not _HOSTNAME_RE.fullmatch(host):
            raise self.error("expected a host name without a port")
        return host.lower()  # Host is matched case-insensitively (RFC 9110 4.2.3)

    def authority(self) -> str:
        return self.parsed(_authority, "a host, optionally with :PORT")

    def _positive(self, value: _N) -> _N:
        if value <= 0:
            raise self.error("must be greater than 0")
        return value


_Schema = Mapping[str, tuple[str, Callable[[_At], Any]]]

# YAML key -> (dataclass field, reader). Keys carry no unit; fields do (`_s`, `_bytes`).
_LIMITS: _Schema = {
    "max_request_line": ("max_request_line_bytes", _At.size),
    "max_header_size": ("max_header_bytes", _At.size),
    "max_header_count": ("max_header_count", _At.count),
    "header_read_timeout": ("header_read_timeout_s", _At.duration),
    "body_read_timeout": ("body_read_timeout_s", _At.duration),
    "send_timeout": ("send_timeout_s", _At.duration),
    "keepalive_timeout": ("keepalive_timeout_s", _At.duration),
    "max_requests_per_connection": ("max_requests_per_connection", _At.count),
    "max_connections": ("max_connections", _At.count),
}
_TIMEOUTS: _Schema = {
    "connect": ("connect_s", _At.duration),
    "response": ("response_s", _At.duration),
    "read_idle": ("read_idle_s", _At.duration),
}
_POOL: _Schema = {
    "max_connections": ("max_connections", _At.count),
    "idle_timeout": ("idle_timeout_s", _At.duration),
    "acquire_timeout": ("acquire_timeout_s", _At.duration),
}
_TLS: _Schema = {
    "verify": ("verify", _At.boolean),
    "ca_file": ("ca_file", _At.text),
    "cert_file": ("cert_file", _At.text),
    "key_file": ("key_file", _At.text),
    "server_name": ("server_name", _At.text),
    # The raw text, so an unquoted `min_version: 1.2` works although YAML reads a float.
    "min_version": ("min_version", lambda at: at.choice("1.2", "1.3")),
}
_DRAIN: _Schema = {
    "grace_period": ("grace_period_s", _At.duration),
    "delay": ("delay_s", lambda at: at.parsed(parse_duration, "a duration like 0s, 250ms, 5s")),
}
_TELEMETRY: _Schema = {
    "traces_exporter": ("traces_exporter", lambda at: at.choice("none", "console", "otlp")),
    "metrics_exporter": ("metrics_exporter", lambda at: at.choice("none", "otlp")),
    "service_name": ("service_name", _At.text),
    "otlp_endpoint": (
        "otlp_endpoint",
        lambda at: at.parsed(parse_otlp_endpoint, "a URL like http://collector:4318"),
    ),
    "sampler_ratio": ("sampler_ratio", _At.ratio),
    "metrics_interval": ("metrics_interval_s", _At.duration),
}
_ACCESS_LOG: _Schema = {
    "enabled": ("enabled", _At.boolean),
    "format": ("format", lambda at: at.choice("json", "text")),
    "path": ("path", _At.text),
}
_BUDGET: _Schema = {
    "ratio": ("budget_ratio", _At.ratio),
    "min_per_second": ("budget_min_per_s", lambda at: float(at.whole_number())),
    "window": ("budget_window_s", _At.duration),
}
_RETRY: _Schema = {
    "retries": ("retries", _At.whole_number),
    "methods": ("methods", _At.methods),
    "on_statuses": ("on_statuses", _At.statuses),
    "backoff_base": ("backoff_base_s", _At.duration),
    "backoff_max": ("backoff_max_s", _At.duration),
    "per_try_timeout": ("per_try_timeout_s", _At.duration),
    "buffer_body": ("buffer_body_bytes", _At.size),
    "respect_retry_after": ("respect_retry_after", _At.boolean),
}
_BREAKER: _Schema = {
    "enabled": ("enabled", _At.boolean),
    "failure_threshold": ("failure_threshold", _At.count),
    "reset_timeout": ("reset_timeout_s", _At.duration),
    "success_threshold": ("success_threshold", _At.count),
    "half_open_max_probes": ("half_open_max_probes", _At.count),
    "min_requests": ("min_requests", _At.whole_number),
    "window": ("window_s", _At.duration),
    "failure_statuses": ("failure_statuses", _At.statuses),
    "failure_errors": (
        "failure_errors",
        lambda at: frozenset(i.choice(*sorted(FAILURE_ERROR_KINDS)) for i in at.items()),
    ),
    "shared": ("shared", lambda at: at.choice("none", "redis")),
    "sync_interval": ("sync_interval_s", _At.duration),
}
_REDIS_TLS: _Schema = {k: _TLS[k] for k in ("verify", "ca_file", "cert_file", "key_file", "min_version")}
_REDIS: _Schema = {
    "url": ("url", lambda at: at.parsed(parse_redis_url, "a URL like redis://redis:6379/0")),
    "timeout": ("timeout_s", _At.duration),
    "key_prefix": ("key_prefix", lambda at: at.parsed(parse_key_prefix, "a key prefix like ra:")),
    "tls": ("tls", lambda at: TLSConfig(**_section(at, _REDIS_TLS))),
}

_DNS: _Schema = {
    "max_ttl": ("max_ttl_s", _At.duration),
    "negative_ttl": ("negative_ttl_s", _At.duration),
    # 0s turns stale serving off: an expired answer is looked up again before connecting.
    "max_stale": ("max_stale_s", lambda at: at.parsed(parse_duration, "a duration like 0s, 30s, 1m")),
    "timeout": ("timeout_s", _At.duration),
}

_ROUTE_CACHE: _Schema = {
    "enabled": ("enabled", _At.boolean),
    "default_ttl": ("default_ttl_s", _At.duration),
    "max_ttl": ("max_ttl_s", _At.duration),
    "key_headers": ("key_headers", _At.header_names),
    "partition_by_credential": ("partition_by_credential", _At.boolean),
    "stale_while_revalidate": ("stale_while_revalidate_s", _At.duration),
    "stale_if_error": ("stale_if_error_s", _At.duration),
    "heuristic": ("heuristic", _At.boolean),
    "store_set_cookie": ("store_set_cookie", _At.boolean),
    "respect_client_no_cache": ("respect_client_no_cache", _At.boolean),
    "max_object_size": ("max_object_bytes", _At.size),
    "coalesce_wait": ("coalesce_wait_s", _At.duration),
}
_CACHE_STORE: _Schema = {
    "backend": ("backend", lambda at: at.choice("memory", "redis")),
    "max_size": ("max_bytes", _At.size),
    "near_cache_size": ("near_cache_bytes", _At.size),
    "near_cache_ttl": ("near_cache_ttl_s", _At.duration),
}


def _route_cache(at: _At) -> RouteCacheConfig:
    """A route's `cache` block; writing the block turns the cache on unless it says
    `enabled: false`."""
    return RouteCacheConfig(**{"enabled": True, **_section(at, _ROUTE_CACHE)})


def parse_otlp_endpoint(text: str) -> str:
    """The OTLP/HTTP collector's base URL (`/v1/traces` and `/v1/metrics` are appended)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or _URL_FORBIDDEN_RE.search(text):
        raise ValueError("expected a URL like http://collector:4318")
    return text


def parse_redis_url(text: str) -> str:
    """redis://, rediss://, unix://, sentinel:// or redis+cluster:// (core.redis_target); the
    URL is never echoed (it may hold a password)."""
    if _URL_FORBIDDEN_RE.search(text):
        raise ValueError("expected a URL like redis://redis:6379/0")
    parse_redis_target(text)
    return text


def parse_key_prefix(text: str) -> str:
    """Braces would make the prefix a Redis Cluster hash tag and defeat the keys' own tags."""
    if "{" in text or "}" in text or _URL_FORBIDDEN_RE.search(text):
        raise ValueError("a key prefix has no braces, spaces or control characters")
    return text


_RELAY: _Schema = {
    "balance": ("balance", lambda at: at.choice("ordered", "round_robin")),
    "connect_timeout": ("connect_timeout_s", _At.duration),
    "idle_timeout": ("idle_timeout_s", _At.duration),
    "max_connections": ("max_connections", _At.count),
    "on_limit": ("on_limit", lambda at: at.choice("refuse", "queue")),
    "queue_timeout": ("queue_timeout_s", _At.duration),
    "connection_rate": ("connection_rate", lambda at: at.parsed(parse_rate, "a rate like 100/s")),
    "breaker": ("breaker", lambda at: BreakerConfig(**_section(at, _BREAKER))),
}
_MATCH: _Schema = {"prefix": ("prefix", _At.path_prefix), "host": ("host", _At.route_host)}
_ROUTE: _Schema = {
    "rewrite_prefix": ("rewrite_prefix", _At.path_prefix),
    "max_request_body": ("max_request_body_bytes", _At.size),
    "timeout": ("timeout_s", _At.duration),
    "deadline_header": ("deadline_header", _At.header_name),
    "retry": ("retry", lambda at: _retry(at)),
    "breaker": ("breaker", lambda at: BreakerConfig(**_section(at, _BREAKER))),
    "rate_limit": ("rate_limit", lambda at: _rate_limit(at)),
    "cache": ("cache", _route_cache),
}
_UPSTREAM: _Schema = {
    "host_header": ("host_header", _At.authority),
    "timeouts": ("timeouts", lambda at: UpstreamTimeouts(**_section(at, _TIMEOUTS))),
    "pool": ("pool", lambda at: PoolConfig(**_section(at, _POOL))),
    "breaker": ("breaker", lambda at: BreakerConfig(**_section(at, _BREAKER))),
    "quota": ("quota", lambda at: _quota(at)),
}
_RATE_LIMIT: _Schema = {
    "burst": ("burst", _At.count),
    "mode": ("mode", lambda at: at.choice("reject", "queue")),
    "max_wait": ("max_wait_s", _At.duration),
    "max_queue": ("max_queue", _At.count),
    "backend": ("backend", lambda at: at.choice("memory", "redis")),
    "on_backend_failure": ("on_backend_failure", lambda at: at.choice("local", "allow", "deny")),
    "expected_replicas": ("expected_replicas", _At.count),
    "lease": ("lease", _At.whole_number),
}
_QUOTA: _Schema = {
    "enabled": ("enabled", _At.boolean),
    "mode": ("mode", lambda at: at.choice("reject", "queue")),
    "max_wait": ("max_wait_s", _At.duration),
    "pace_below": ("pace_below", _At.ratio),
    "shared": ("shared", lambda at: at.choice("none", "redis")),
}
RATE_FORM = "a rate like 10/s, 600/m, 10000/h"


def _rate_limit(at: _At) -> RateLimitConfig:
    """`rate` (required), `key` (route, upstream, client_ip, header:NAME, credential) and the
    optional `_RATE_LIMIT` keys; burst defaults to one second's worth of the rate."""
    found = at.fields(("rate", "key", *_RATE_LIMIT), ("rate",))
    count, period_s = found["rate"].parsed(parse_rate, RATE_FORM)
    fields = _read(found, _RATE_LIMIT)
    fields.setdefault("burst", default_burst(count, period_s))
    key_at = found.get("key")
    if key_at is not None:
        key = key_at.text()
        if key.startswith("header:"):
            name = key.removeprefix("header:").strip()
            with _reported(key_at.where):
                if not _TOKEN_RE.fullmatch(name):
                    raise ValueError(f"{name!r} is not a valid header name")
            fields.update(key="header", key_header=name.lower())
        elif key in ("route", "upstream", "client_ip", "credential"):
            fields["key"] = key
        else:
            raise key_at.error("expected one of: route, upstream, client_ip, header:NAME, credential")
    config = RateLimitConfig(count, period_s, **fields)
    lease_at = found.get("lease")
    if lease_at is not None and config.lease > 0:
        if config.backend != "redis" or config.mode != "reject":
            raise lease_at.error("a lease needs backend: redis and mode: reject")
        if config.lease > config.burst:
            raise lease_at.error(f"a lease of {config.lease} is more than the burst ({config.burst})")
    return config


def _quota(at: _At) -> QuotaConfig:
    """Giving the section turns quota awareness on (unless it says `enabled: false`)."""
    fields = _section(at, _QUOTA)
    fields.setdefault("enabled", True)
    return QuotaConfig(**fields)


def _retry(at: _At) -> RetryConfig:
    found = at.fields((*_RETRY, "budget"))
    fields = _read(found, _RETRY)
    fields.update(_section(found.get("budget"), _BUDGET))  # nested in YAML, flat in the model
    config = RetryConfig(**fields)
    if config.backoff_max_s < config.backoff_base_s:
        raise at.error("backoff_max must not be below backoff_base")
    return config


def _read(found: dict[str, _At], schema: _Schema) -> dict[str, Any]:
    return {field: read(found[key]) for key, (field, read) in schema.items() if key in found}


def _section(at: _At | None, schema: _Schema) -> dict[str, Any]:
    """Keyword arguments for a dataclass from a mapping of optional keys; None: all defaults."""
    return {} if at is None else _read(at.fields(tuple(schema)), schema)


def _check_client_tls(at: _At, tls: TLSConfig) -> None:
    """A client certificate comes with its key, and every file loads now, so check-config
    catches a bad one (upstreams, relays and Redis alike)."""
    if (tls.cert_file is None) != (tls.key_file is None):
        raise at.error("cert_file and key_file must be set together")
    try:
        client_context(tls)
    except (OSError, ssl.SSLError) as e:
        raise at.error(f"cannot load the TLS files: {e}") from None


def load_config(path: str | os.PathLike[str], resolver: SecretResolver | None = None) -> Config:
    """Load and validate a YAML config file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read the config: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: the config is not valid UTF-8") from None
    return load_config_text(text, source, resolver)


def load_config_text(text: str, source: str = "<string>", resolver: SecretResolver | None = None) -> Config:
    """Validate YAML config text; `source` names it in messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        # `problem` only: str(e) quotes the offending line, which may hold a literal secret.
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{source}:{line}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    if node is None:
        raise ConfigError(f"{source}:1: the config is empty")
    root = _At(source, node.start_mark.line + 1, "", node)
    return _Builder(resolver or SecretResolver()).config(root)


def config_from_flags(
    listen: str, upstream: str, headers: list[str], resolver: SecretResolver | None = None
) -> Config:
    """The one-liner form: listener "main" forwards everything to upstream "default"."""
    resolver = resolver or SecretResolver()
    with _reported(f"--listen {listen!r}:"):
        host, port = parse_listen_address(listen)
    with _reported("--upstream:"):  # the URL is not echoed: it may carry user:password@
        url = parse_upstream_url(upstream, allow_tcp=True)
    if url.scheme in ("tcp", "tls"):
        if headers:
            raise ConfigError("--header: a tcp:// or tls:// upstream relays bytes; there are no headers")
        relay = RelayConfig(upstreams=(url,))
        return Config(listeners=(ListenerConfig("main", host, port, "tcp", relay=relay),), upstreams={})
    injected: dict[str, tuple[str, Template]] = {}
    for flag in headers:
        name, colon, value = flag.partition(":")
        if not colon:
            raise ConfigError("--header: expected 'Name: value'")
        with _reported(f"--header '{name}: ...':"):
            _check_header_name(name)
            if name.lower() in injected:
                raise ValueError("the header is given twice")
            injected[name.lower()] = (name, _checked_template(value.strip(), resolver))
    return Config(
        listeners=(
            ListenerConfig("main", host, port, routes=(RouteConfig("default", name="main-route-0"),)),
        ),
        upstreams={"default": UpstreamConfig("default", url, headers=tuple(injected.values()))},
    )


def parse_listen_address(text: str) -> tuple[str, int]:
    """`(host, port)` from `127.0.0.1:8000`, `localhost:8000` or `[::1]:8000`; port 0 asks the
    OS for a free port (tests use it)."""
    host, port = _split_host_port(text, _LISTEN_FORM)
    if port is None:
        raise ValueError(_LISTEN_FORM)
    return host, port


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def addresses_overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two listen addresses would take the same port: equal hosts, or either one a
    wildcard. Port 0 asks the OS for a free port, so it never overlaps."""
    (host_a, port_a), (host_b, port_b) = a, b
    if port_a == 0 or port_a != port_b:
        return False
    host_a, host_b = host_a.lower(), host_b.lower()
    return host_a == host_b or host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS


def admin_clash(config: Config) -> ListenerConfig | None:
    """The data listener whose address the admin listener would share, if any."""
    admin = config.admin
    if not admin.enabled:
        return None
    for listener in config.listeners:
        if addresses_overlap((admin.host, admin.port), (listener.host, listener.port)):
            return listener
    return None


def parse_upstream_url(text: str, *, allow_tcp: bool = False) -> UpstreamURL:
    """An `http://` or `https://` URL; its path becomes the base path. With `allow_tcp` (the
    one-liner), also a `tcp://` or `tls://` relay address. Messages never echo the URL: it may
    carry credentials."""
    if _URL_FORBIDDEN_RE.search(text):
        raise ValueError("the URL contains whitespace or control characters")
    parts = urlsplit(text)
    if allow_tcp and parts.scheme in ("tcp", "tls"):
        return parse_relay_address(text)
    if not parts.netloc:
        raise ValueError("expected a URL like https://api.example.com/v1")
    if parts.scheme in ("tcp", "tls") and not allow_tcp:
        raise ValueError(f"{parts.scheme}:// addresses belong in a tcp listener's relay.upstreams")
    if parts.scheme not in ("http", "https"):
        expected = "http://, https://, tcp:// or tls://" if allow_tcp else "http:// or https://"
        raise ValueError(f"unsupported scheme {parts.scheme}:// (expected {expected})")
    if "@" in parts.netloc:
        raise ValueError("credentials in the URL (user:password@) are not supported; use headers")
    if "?" in text:
        raise ValueError("a query string in the URL is not supported; use the query mapping")
    if "#" in text:
        raise ValueError("a fragment (#...) in the URL is not supported")
    if parts.path and not _PATH_RE.fullmatch(parts.path):
        raise ValueError("the URL path has characters that must be percent-encoded")
    host, port = _split_host_port(parts.netloc, "invalid host or port in the URL")
    if port == 0:
        raise ValueError("port must be 1..65535")
    scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
    if port is None:
        port = 443 if scheme == "https" else 80
    return UpstreamURL(scheme, host.lower(), port, parts.path.rstrip("/"))


def parse_relay_address(text: str) -> UpstreamURL:
    """`tcp://host:port` or `tls://host[:port]` (443 by default): a relay upstream address."""
    if _URL_FORBIDDEN_RE.search(text):
        raise ValueError("the address contains whitespace or control characters")
    parts = urlsplit(text)
    if parts.scheme not in ("tcp", "tls") or not parts.netloc:
        raise ValueError("expected an address like tcp://db.example.com:5432 or tls://api.example.com:443")
    if "@" in parts.netloc:
        raise ValueError("credentials in the address (user:password@) are not supported")
    if parts.path or "?" in text or "#" in text:
        raise ValueError("a tcp:// or tls:// address is HOST:PORT only (no path, query or fragment)")
    host, port = _split_host_port(parts.netloc, "invalid host or port in the address")
    if port is None and parts.scheme == "tls":
        port = 443
    if port is None:
        raise ValueError("a tcp:// address needs a port, like tcp://db.example.com:5432")
    if port == 0:
        raise ValueError("port must be 1..65535")
    scheme: Literal["tcp", "tls"] = "tls" if parts.scheme == "tls" else "tcp"
    return UpstreamURL(scheme, host.lower(), port)


@final
class _Builder:
    """Walks the YAML tree of one load: checks secrets with the resolver as it goes and
    remembers names and addresses to catch duplicates."""

    def __init__(self, resolver: SecretResolver) -> None:
        self._resolver = resolver
        self._upstreams: dict[str, UpstreamConfig] = {}
        self._addresses: dict[tuple[str, int], _At] = {}
        self._listener_names: dict[str, _At] = {}
        self._route_names: dict[str, _At] = {}
        self._redis_rate_limits: list[_At] = []  # checked against redis.url at the end

    def _redis(self, at: _At | None) -> RedisConfig:
        redis = RedisConfig(**_section(at, _REDIS))
        if at is None or redis.tls is None:
            return redis
        tls_at = at.fields(tuple(_REDIS))["tls"]
        if redis.url is None or not parse_redis_target(redis.url).tls:
            raise tls_at.error("tls is set but redis.url is not rediss:// or rediss+cluster://")
        _check_client_tls(tls_at, redis.tls)
        return redis

    def config(self, root: _At) -> Config:
        found = root.fields(
            (
                "listeners",
                "upstreams",
                "drain",
                "redis",
                "admin",
                "access_log",
                "workers",
                "telemetry",
                "cache",
                "dns",
            ),
            ("listeners",),
        )
        redis = self._redis(found.get("redis"))
        cache = CacheStoreConfig(**_section(found.get("cache"), _CACHE_STORE))
        if cache.backend == "redis" and redis.url is None:
            backend = found["cache"].fields(tuple(_CACHE_STORE))["backend"]
            raise backend.error("the cache backend is redis but the config has no redis.url")
        # A config of tcp listeners only needs no upstreams section (relays name their addresses).
        upstreams_at = found.get("upstreams")
        if upstreams_at is None:
            if not all(_is_tcp_listener(item) for item in found["listeners"].items()):
                raise root.key("upstreams", root.line, root.node).error("missing required key")
            upstreams_at = _At(root.source, root.line, "upstreams", yaml.MappingNode("", []))
        # Upstreams first, so routes can be checked against them.
        for name, at in upstreams_at.entries():
            if not _NAME_RE.fullmatch(name):
                raise at.error(f"an upstream name is made of {_NAME_RULE}")
            self._upstreams[name] = self._upstream(name, at)
        listeners = tuple(self._listener(at, i) for i, at in enumerate(found["listeners"].items()))
        drain = DrainConfig(**_section(found.get("drain"), _DRAIN))
        if redis.url is None:
            for name, at in upstreams_at.entries():
                if self._upstreams[name].breaker.shared == "redis":
                    raise at.error("breaker.shared is redis but the config has no redis.url")
                if self._upstreams[name].quota.shared == "redis":
                    raise at.error("quota.shared is redis but the config has no redis.url")
            for at in self._redis_rate_limits:
                raise at.error("backend is redis but the config has no redis.url")
        admin = self._admin(found.get("admin"))
        access_log = AccessLogConfig(**_section(found.get("access_log"), _ACCESS_LOG))
        workers = found["workers"].count() if "workers" in found else 1
        telemetry = TelemetryConfig(**_section(found.get("telemetry"), _TELEMETRY))
        dns = DNSConfig(**_section(found.get("dns"), _DNS))
        return Config(
            listeners,
            self._upstreams,
            drain,
            root.source,
            redis,
            admin,
            access_log,
            workers,
            telemetry,
            cache,
            dns,
        )

    def _admin(self, at: _At | None) -> AdminConfig:
        """`admin: {listen: HOST:PORT, enabled: false}`; refused on a data listener's address."""
        found = at.fields(("enabled", "listen")) if at is not None else {}
        admin = AdminConfig()
        if "enabled" in found:
            admin = AdminConfig(enabled=found["enabled"].boolean())
        listen = found.get("listen")
        if listen is not None:
            host, port = listen.parsed(parse_listen_address, "HOST:PORT")
            admin = AdminConfig(admin.enabled, host, port)
        if not admin.enabled:
            return admin
        for (host, port), data in self._addresses.items():
            if addresses_overlap((admin.host, admin.port), (host, port)):
                if listen is None:
                    raise data.error(
                        f"the admin listener uses {admin.host}:{admin.port} by default; "
                        "set admin.listen to another address"
                    )
                raise listen.error(
                    f"same address as {data.path} (line {data.line}); "
                    "the admin listener never shares a data port"
                )
        return admin

    def _listener(self, at: _At, index: int) -> ListenerConfig:
        found = at.fields(("name", "listen", "protocol", "limits", "routes", "relay", "tls"), ("listen",))
        name = _claim(self._listener_names, found.get("name"), at, f"listener-{index}")
        listen = found["listen"]
        host, port = listen.parsed(parse_listen_address, "HOST:PORT")
        # Port 0 asks the OS for a free port, so two such listeners never clash.
        first = self._addresses.setdefault((host.lower(), port), listen)
        if port and first is not listen:
            raise listen.error(f"address already used by {first.path} (line {first.line})")
        protocol = found.get("protocol")
        if protocol is not None and protocol.choice("http", "tcp") == "tcp":
            return self._tcp_listener(at, found, name, host, port)
        for key in ("relay", "tls"):
            if key in found:
                raise found[key].error("only for protocol: tcp listeners")
        if "routes" not in found:
            raise at.key("routes", at.line, at.node).error("missing required key")
        routes = tuple(
            self._route(route, f"{name}-route-{i}") for i, route in enumerate(found["routes"].items())
        )
        limits = ClientLimits(**_section(found.get("limits"), _LIMITS))
        return ListenerConfig(name, host, port, "http", routes, limits)

    def _tcp_listener(
        self, at: _At, found: dict[str, _At], name: str, host: str, port: int
    ) -> ListenerConfig:
        for key in ("routes", "limits"):
            if key in found:
                raise found[key].error("not for a tcp listener (it has a relay section)")
        if "relay" not in found:
            raise at.key("relay", at.line, at.node).error("missing required key (a tcp listener relays)")
        tls: ListenerTLS | None = None
        if (tls_at := found.get("tls")) is not None:
            files = tls_at.fields(("cert_file", "key_file"), ("cert_file", "key_file"))
            tls = ListenerTLS(files["cert_file"].text(), files["key_file"].text())
            try:  # load now, so check-config catches a bad file
                server_context(tls)
            except (OSError, ssl.SSLError) as e:
                raise tls_at.error(f"cannot load the TLS files: {e}") from None
        return ListenerConfig(name, host, port, "tcp", relay=self._relay(found["relay"]), tls=tls)

    def _relay(self, at: _At) -> RelayConfig:
        found = at.fields((*_RELAY, "upstreams", "tls"), ("upstreams",))
        upstreams = tuple(
            item.parsed(parse_relay_address, "an address like tls://api.example.com:443")
            for item in found["upstreams"].items()
        )
        tls_at = found.get("tls")
        if tls_at is not None and not any(url.scheme == "tls" for url in upstreams):
            raise tls_at.error("tls is set but no upstream address is tls://")
        tls = TLSConfig(**_section(tls_at, _TLS))
        if tls_at is not None:
            _check_client_tls(tls_at, tls)
        relay = RelayConfig(upstreams=upstreams, tls=tls, **_read(found, _RELAY))
        if relay.breaker.shared != "none":
            raise (
                found["breaker"]
                .key("shared", found["breaker"].line, found["breaker"].node)
                .error("sharing is not supported for a tcp listener's breaker yet (use none)")
            )
        return relay

    def _route(self, at: _At, default_name: str) -> RouteConfig:
        found = at.fields(
            (
                "name",
                "match",
                "rewrite_prefix",
                "upstream",
                "max_request_body",
                "timeout",
                "deadline_header",
                "retry",
                "breaker",
                "rate_limit",
                "cache",
            ),
            ("upstream",),
            policies=True,
        )
        upstream = found["upstream"].text()
        if upstream not in self._upstreams:
            defined = ", ".join(self._upstreams) or "none"
            raise found["upstream"].error(f"unknown upstream {upstream!r} (defined: {defined})")
        route = RouteConfig(
            upstream,
            _claim(self._route_names, found.get("name"), at, default_name),
            **_section(found.get("match"), _MATCH),
            **_read(found, _ROUTE),
        )
        if route.rate_limit is not None and route.rate_limit.backend == "redis":
            self._redis_rate_limits.append(found["rate_limit"])
        return route

    def _upstream(self, name: str, at: _At) -> UpstreamConfig:
        found = at.fields(
            ("url", "host_header", "tls", "timeouts", "pool", "breaker", "headers", "query", "quota"),
            ("url",),
            policies=True,
        )
        url = found["url"].parsed(parse_upstream_url, "a URL like https://api.example.com")
        tls_at = found.get("tls")
        if tls_at is not None and not url.uses_tls:
            raise tls_at.error("tls is set but the URL is http:// (use https://)")
        tls = TLSConfig(**_section(tls_at, _TLS))
        if tls_at is not None:
            _check_client_tls(tls_at, tls)
        return UpstreamConfig(
            name,
            url,
            tls,
            headers=self._headers(found.get("headers")),
            query=self._query(found.get("query")),
            **_read(found, _UPSTREAM),
        )

    def _headers(self, at: _At | None) -> tuple[tuple[str, Template], ...]:
        out: list[tuple[str, Template]] = []
        first: dict[str, _At] = {}
        for name, value in at.entries() if at is not None else ():
            with _reported(value.where):
                _check_header_name(name)
            # Field names are case-insensitive (RFC 9110 5.1): `Authorization` and
            # `authorization` would both be sent.
            if (prev := first.setdefault(name.lower(), value)) is not value:
                raise value.error(f"same header as {prev.path} (line {prev.line})")
            out.append((name, self._template(value)))
        return tuple(out)

    def _query(self, at: _At | None) -> tuple[tuple[str, Template], ...]:
        out: list[tuple[str, Template]] = []
        for name, value in at.entries() if at is not None else ():
            if not name:
                raise value.error("empty query parameter name")
            out.append((name, self._template(value)))
        return tuple(out)

    def _template(self, at: _At) -> Template:
        text = at.text()
        with _reported(at.where):
            return _checked_template(text, self._resolver)


def _is_tcp_listener(at: _At) -> bool:
    """Whether a listener item says `protocol: tcp` (read before the listeners are built)."""
    if not isinstance(at.node, yaml.MappingNode):
        return False
    return any(
        isinstance(k, yaml.ScalarNode) and k.value == "protocol" and getattr(v, "value", None) == "tcp"
        for k, v in at.node.value
    )


def _claim(names: dict[str, _At], name_at: _At | None, item: _At, default: str) -> str:
    """The item's name (given or `default`), refused if an earlier item has it."""
    at = name_at or item
    name = name_at.name() if name_at is not None else default
    if (first := names.setdefault(name, at)) is not at:
        raise at.error(f"name {name!r} is already used by {first.path} (line {first.line})")
    return name


def _checked_template(text: str, resolver: SecretResolver) -> Template:
    """Parse a template and resolve it once, so a missing variable or file fails the load."""
    template = parse_template(text)
    resolver.check(template)
    return template


def _check_header_name(name: str) -> None:
    if not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if name.lower() == "host":
        raise ValueError("Host cannot be injected; use the upstream's host_header")
    if name.lower() in _NOT_INJECTABLE:
        raise ValueError(f"{name} is a hop-by-hop or framing header; the proxy manages it")


def _split_host_port(text: str, expected: str) -> tuple[str, int | None]:
    m = _HOST_PORT_RE.fullmatch(text)
    if m is None:
        raise ValueError(expected)
    port = None if m["port"] is None else int(m["port"])
    if port is not None and port > 65535:
        raise ValueError("port must be at most 65535")
    if m["v6"] is not None:
        try:
            ipaddress.IPv6Address(m["v6"])
        except ValueError:
            raise ValueError(expected) from None
        return m["v6"], port
    if not _HOSTNAME_RE.fullmatch(m["host"]):
        raise ValueError(expected)
    return m["host"], port


def _authority(text: str) -> str:
    _split_host_port(text, "expected a host, optionally with :PORT")
    return text


def _parse_ratio(text: str) -> float:
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= value <= 10:
        raise ValueError("expected a ratio between 0 and 10 (0% to 1000%)")
    return value


def _parse_count(text: str) -> int:
    if not _COUNT_RE.fullmatch(text):
        raise ValueError("expected a whole number")
    return int(text)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "nothing (null)" if node.tag == _NULL_TAG else "a single value"
