"""Value templates for injected headers and query parameters: `${VAR}` and `${file:/path}`.

Parsing is pure; resolving (reading the environment or a file) happens in
`resilient_ambassador.secrets`, so a template can be checked without touching the filesystem.
"""

from __future__ import annotations

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
