"""The effective config as a JSON-ready document for the admin `/config` endpoint, with every
secret redacted.

Injected header and query values are shown as their template source with the references
(`${VAR}`, `${file:/path}`) kept and literal text replaced by `<redacted>`: a literal value
is as likely to be an API key as a reference is to point at one. The one literal kept is a
leading authentication scheme (`Bearer `, RFC 9110 11.4), which says how the value is used
and is never itself the secret. A Redis URL loses its password. Nothing here ever sees a
resolved value: resolving is `secrets.SecretResolver`'s job, and this module cannot import it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from resilient_ambassador.core.config import Config, RedisConfig, UpstreamConfig, UpstreamURL
from resilient_ambassador.core.templates import Template

REDACTED = "<redacted>"
# auth-scheme = token, then one space (RFC 9110 11.4): `Bearer `, `Basic `, `Token `.
_AUTH_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]* ")

Json: TypeAlias = "bool | int | float | str | list[Json] | dict[str, Json] | None"


def config_document(config: Config) -> dict[str, Json]:
    doc = _value(config)
    assert isinstance(doc, dict)
    return doc


def redact_template(template: Template) -> str:
    out: list[str] = []
    for i, part in enumerate(template.parts):
        if part.kind == "env":
            out.append(f"${{{part.value}}}")
        elif part.kind == "file":
            out.append(f"${{file:{part.value}}}")
        elif i == 0 and len(template.parts) > 1 and _AUTH_SCHEME_RE.fullmatch(part.value):
            out.append(part.value)
        else:
            out.append(REDACTED)
    return "".join(out)


def redact_url(url: str) -> str:
    """The URL without its password (userinfo or a `password=` query parameter)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon:  # redis://user:password@host or redis://:password@host
            netloc = f"{user}:{REDACTED}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, REDACTED if k.lower() in ("password", "username") else v) for k, v in pairs], safe="<>"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _value(value: object) -> Json:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Template):
        return redact_template(value)
    if isinstance(value, UpstreamURL):
        return str(value)
    if isinstance(value, UpstreamConfig):
        doc = _fields(value)
        # Injected headers and query parameters: a mapping of name -> redacted template.
        doc["headers"] = {name: redact_template(template) for name, template in value.headers}
        doc["query"] = {name: redact_template(template) for name, template in value.query}
        return doc
    if isinstance(value, RedisConfig):
        doc = _fields(value)
        doc["url"] = None if value.url is None else redact_url(value.url)
        return doc
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    if isinstance(value, dict):
        return {str(k): _value(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return [_value(v) for v in sorted(value)]
    if isinstance(value, tuple | list):
        return [_value(v) for v in value]
    raise TypeError(f"cannot render {type(value).__name__} in the config document")


def _fields(value: object) -> dict[str, Json]:
    assert dataclasses.is_dataclass(value)
    return {f.name: _value(getattr(value, f.name)) for f in dataclasses.fields(value)}
