"""Value templates for injected headers and query parameters: `${VAR}` and `${file:/path}`.

Parsing is pure; resolving (reading the environment or a file) happens in
`resilient_ambassador.secrets`, so a template can be checked without touching the filesystem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, final


@final
@dataclass(frozen=True, slots=True)
class TemplatePart:
    kind: Literal["text", "env", "file"]
    value: str  # literal text, variable name, or file path


@final
@dataclass(frozen=True, slots=True)
class Template:
    parts: tuple[TemplatePart, ...]
    source: str  # the template as written (never the resolved secret)

    @property
    def is_secret(self) -> bool:
        """True when any part comes from the environment or a file: treat the value as secret."""
        return any(p.kind != "text" for p in self.parts)


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_template(text: str) -> Template:
    """Split `Bearer ${file:/run/token}` into text and reference parts.

    `$$` is a literal `$`. A lone `$` is an error rather than literal text: `Bearer $TOKEN`
    is almost always a mistaken `${TOKEN}`, and sending it verbatim would only surface later
    as an upstream 401.
    """
    parts: list[TemplatePart] = []
    literal = ""
    i = 0
    while (j := text.find("$", i)) >= 0:
        literal += text[i:j]
        after = text[j + 1 : j + 2]
        if after == "$":
            literal += "$"
            i = j + 2
            continue
        if after != "{":
            raise ValueError(
                f"lone '$' at position {j}: write ${{NAME}} or ${{file:/path}} to insert a value,"
                " or $$ for a literal $"
            )
        end = text.find("}", j + 2)
        if end < 0:
            raise ValueError(f"unclosed '${{' at position {j}")
        if literal:
            parts.append(TemplatePart("text", literal))
            literal = ""
        parts.append(_reference(text[j + 2 : end]))
        i = end + 1
    literal += text[i:]
    if literal:
        parts.append(TemplatePart("text", literal))
    return Template(tuple(parts), text)


def _reference(body: str) -> TemplatePart:
    kind, colon, arg = body.partition(":")
    if colon:
        if kind != "file":
            raise ValueError(
                f"unknown reference kind {kind!r} in ${{{body}}} (expected ${{NAME}} or ${{file:/path}})"
            )
        if not arg.startswith("/"):
            # A relative path would depend on the daemon's working directory.
            raise ValueError(f"${{file:...}} needs an absolute path, got {arg!r}")
        return TemplatePart("file", arg)
    if not body:
        raise ValueError("empty variable name in ${}")
    if not _NAME_RE.fullmatch(body):
        raise ValueError(f"invalid variable name {body!r} in ${{{body}}} (expected letters, digits and _)")
    return TemplatePart("env", body)
