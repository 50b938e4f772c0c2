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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, final
from urllib.parse import urlsplit

import yaml

from resilient_ambassador.core.config import (
    ClientLimits,
    Config,
    DrainConfig,
    ListenerConfig,
    PoolConfig,
    RouteConfig,
    TLSConfig,
    UpstreamConfig,
    UpstreamTimeouts,
    UpstreamURL,
)
from resilient_ambassador.core.templates import Template, parse_template
from resilient_ambassador.core.units import parse_duration, parse_size
from resilient_ambassador.secrets import SecretError, SecretResolver

_T = TypeVar("_T")
_N = TypeVar("_N", int, float)

_NULL_TAG = "tag:yaml.org,2002:null"
# Names become log fields and metric labels, so keep them plain.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_HOST_PORT_RE = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]+))(?::(?P<port>[0-9]{1,5}))?")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 5.6.2
_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")  # RFC 3986 3.3 path-absolute
_URL_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f]")  # urlsplit silently drops tabs/newlines

# Connection-specific (RFC 9110 7.6.1, plus the RFC 2616 13.5.1 list proxies still honour) or
# framing (RFC 9112 6): set per hop by the proxy, never injected from config.
_NOT_INJECTABLE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)
# Policy sections later versions add; named here so a config written for a newer version
# fails loudly instead of running without its retries or limits.
_RESERVED = ("retry", "breaker", "rate_limit", "cache")


class ConfigError(Exception):
    """An invalid config, as `source:line: key.path: problem`. Never contains a secret value."""


@final
@dataclass(frozen=True, slots=True)
class _At:
    """A YAML node and where it is (source, line, key path), so every check can say so."""

    source: str
    line: int
    path: str
    node: yaml.Node

    def error(self, message: str) -> ConfigError:
        where = f" {self.path}:" if self.path else ""
        return ConfigError(f"{self.source}:{self.line}:{where} {message}")

    @contextmanager
    def reported(self) -> Iterator[None]:
        """Turn a `ValueError` or `SecretError` from a parser into a `ConfigError` here."""
        try:
            yield
        except (ValueError, SecretError) as e:
            raise self.error(str(e)) from None

    def key(self, key: str, line: int, node: yaml.Node) -> _At:
        return _At(self.source, line, f"{self.path}.{key}" if self.path else key, node)

    def entries(self) -> list[tuple[str, _At]]:
        """A mapping's entries in order; duplicate keys are an error (PyYAML keeps the last)."""
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
            if policies and key in _RESERVED:
                raise at.error(f"{key} is not implemented in this version yet")
            if key not in allowed:
                raise at.error(f"unknown key (expected one of: {', '.join(allowed)})")
        for key in required:
            if key not in found:
                raise self.key(key, self.line, self.node).error("missing required key")
        return found

    def items(self) -> list[_At]:
        """A non-empty list's items, each with its own line."""
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
        with self.reported():
            return parse(text)

    def name(self) -> str:
        name = self.text()
        if not _NAME_RE.fullmatch(name):
            raise self.error("expected a name of letters, digits, '.', '_' and '-'")
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

    def path_prefix(self) -> str:
        prefix = self.text()
        if not _PATH_RE.fullmatch(prefix):
            raise self.error("expected a path starting with /")
        return prefix

    def _positive(self, value: _N) -> _N:
        if value <= 0:
            raise self.error("must be greater than 0")
        return value


_Reader = Callable[[_At], Any]
# YAML key -> (dataclass field, reader). Keys carry no unit; fields do (`_s`, `_bytes`).
_LIMITS: Mapping[str, tuple[str, _Reader]] = {
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
_TIMEOUTS: Mapping[str, tuple[str, _Reader]] = {
    "connect": ("connect_s", _At.duration),
    "response": ("response_s", _At.duration),
    "read_idle": ("read_idle_s", _At.duration),
}
_POOL: Mapping[str, tuple[str, _Reader]] = {
    "max_connections": ("max_connections", _At.count),
    "idle_timeout": ("idle_timeout_s", _At.duration),
    "acquire_timeout": ("acquire_timeout_s", _At.duration),
}
_TLS: Mapping[str, tuple[str, _Reader]] = {
    "verify": ("verify", _At.boolean),
    "ca_file": ("ca_file", _At.text),
    "cert_file": ("cert_file", _At.text),
    "key_file": ("key_file", _At.text),
    "server_name": ("server_name", _At.text),
    "min_version": ("min_version", lambda at: at.choice("1.2", "1.3")),
}
_DRAIN: Mapping[str, tuple[str, _Reader]] = {
    "grace_period": ("grace_period_s", _At.duration),
}


def _section(at: _At, schema: Mapping[str, tuple[str, _Reader]]) -> dict[str, Any]:
    """Keyword arguments for a dataclass whose fields are all optional scalars."""
    found = at.fields(tuple(schema))
    return {field: read(found[key]) for key, (field, read) in schema.items() if key in found}


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


def load_config_text(
    text: str, source: str = "<string>", resolver: SecretResolver | None = None
) -> Config:
    """Validate YAML config text; `source` names it in error messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        # `problem` only: str(e) quotes the offending line, which may hold a literal secret.
        mark = e.problem_mark or e.context_mark
        raise ConfigError(f"{source}:{mark.line + 1 if mark else 1}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    if node is None:
        raise ConfigError(f"{source}:1: the config is empty")
    return _Builder(resolver or SecretResolver()).config(_At(source, node.start_mark.line + 1, "", node))


def config_from_flags(
    listen: str, upstream: str, headers: list[str], resolver: SecretResolver | None = None
) -> Config:
    """The one-liner form: one listener "main" forwarding everything to upstream "default"."""
    resolver = resolver or SecretResolver()
    with _flag(f"--listen {listen!r}"):
        host, port = parse_listen_address(listen)
    with _flag("--upstream"):  # the value is not echoed: it may carry user:password@
        url = parse_upstream_url(upstream)
    injected: list[tuple[str, Template]] = []
    for flag in headers:
        name, colon, value = flag.partition(":")
        if not colon:
            raise ConfigError("--header: expected 'Name: value'")
        with _flag(f"--header '{name}: ...'"):
            injected.append(_injected_header(name, value.strip(), resolver))
            if name.lower() in (n.lower() for n, _ in injected[:-1]):
                raise ValueError("the header is given twice")
    route = RouteConfig(upstream="default", name="main-route-0")
    return Config(
        listeners=(ListenerConfig(name="main", host=host, port=port, routes=(route,)),),
        upstreams={"default": UpstreamConfig(name="default", url=url, headers=tuple(injected))},
    )


def parse_listen_address(text: str) -> tuple[str, int]:
    """`(host, port)` from `127.0.0.1:8000`, `localhost:8000` or `[::1]:8000`; port 0 asks
    the OS for a free port (tests use it)."""
    host, port = _split_host_port(text)
    if port is None:
        raise ValueError("expected HOST:PORT like 127.0.0.1:8000 or [::1]:8000")
    return host, port


def parse_upstream_url(text: str) -> UpstreamURL:
    """An `http://` or `https://` upstream URL; its path becomes the base path. Messages
    never echo the URL, which may carry credentials."""
    if _URL_FORBIDDEN_RE.search(text):
        raise ValueError("the URL contains whitespace or control characters")
    parts = urlsplit(text)
    if not parts.netloc:
        raise ValueError("expected a URL like https://api.example.com/v1")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"unsupported scheme {parts.scheme}:// (expected http:// or https://)")
    if "@" in parts.netloc:
        raise ValueError("credentials in the URL (user:password@) are not supported; use headers")
    if "?" in text:
        raise ValueError("a query string in the URL is not supported; use the query mapping")
    if "#" in text:
        raise ValueError("a fragment (#...) in the URL is not supported")
    host, port = _split_host_port(parts.netloc)
    if port == 0:
        raise ValueError("port must be 1..65535")
    scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
    default_port = 443 if scheme == "https" else 80
    return UpstreamURL(scheme, host.lower(), port or default_port, parts.path.rstrip("/"))


@final
class _Builder:
    """Walks the YAML tree top-down; holds the resolver that checks secrets as it goes."""

    def __init__(self, resolver: SecretResolver) -> None:
        self._resolver = resolver

    def config(self, root: _At) -> Config:
        found = root.fields(("listeners", "upstreams", "drain"), ("listeners", "upstreams"))
        # Upstreams first, so routes can be checked against them.
        upstreams = {
            at.name(): self._upstream(at.path.rpartition(".")[2], at)
            for _, at in found["upstreams"].entries()
        }
        listeners: list[ListenerConfig] = []
        bound: dict[tuple[str, int], _At] = {}
        for index, at in enumerate(found["listeners"].items()):
            listener = self._listener(at, index, upstreams)
            address = (listener.host.lower(), listener.port)
            if listener.port and address in bound:  # port 0: each bind gets its own port
                raise at.error(f"{at.path}: same address as {bound[address].path} (line {bound[address].line})")
            bound[address] = at
            listeners.append(listener)
        drain = DrainConfig(**_section(found["drain"], _DRAIN)) if "drain" in found else DrainConfig()
        return Config(tuple(listeners), upstreams, drain, root.source)
