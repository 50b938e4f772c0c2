"""Resolving value templates: `${VAR}` from the environment, `${file:/path}` from a file.

Files are re-read when they change, because Kubernetes rotates a mounted Secret by atomically
swapping the `..data` symlink; `os.stat` follows the link, so a new inode, mtime or size tells
us. A file is stat'ed at most once per `recheck_interval_s`, so resolving on the request path
is a dict lookup and a clock read. Neither an error message nor a log line ever contains a
resolved value.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import final

from resilient_ambassador.core.templates import Template

logger = logging.getLogger("resilient_ambassador.secrets")

# CR or LF would split the header (request smuggling); NUL is rejected by most parsers.
_FORBIDDEN_RE = re.compile(r"[\r\n\0]")
# Far above any real token; keeps a mistaken path (a log file, /dev/zero) from being loaded.
_MAX_FILE_BYTES = 64 * 1024


class SecretError(Exception):
    """A template cannot be resolved. The message names the variable or file, never a value."""


@final
@dataclass(slots=True)
class _CachedFile:
    value: str
    stamp: tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size
    next_check: float
    warned: bool = False  # a failed re-read was logged; reset by the next good read


@final
class SecretResolver:
    """Resolves templates, caching file contents and re-reading files that changed."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        recheck_interval_s: float = 1.0,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._clock = clock
        self._recheck_interval_s = recheck_interval_s
        self._files: dict[str, _CachedFile] = {}
        self._secret_values: set[str] = set()

    def resolve(self, t: Template) -> str:
        """The template's current value; raises `SecretError` when a part cannot be resolved."""
        out: list[str] = []
        for part in t.parts:
            if part.kind == "text":
                out.append(_checked(part.value, "literal text"))
            elif part.kind == "env":
                out.append(self._env(part.value))
            else:
                out.append(self._file(part.value))
        return "".join(out)

    def check(self, t: Template) -> None:
        """Resolve once and discard, so a missing variable or file is a config-load error
        rather than a failure on the first request."""
        self.resolve(t)

    def secret_values(self) -> set[str]:
        """Every value an env or file part has resolved to so far, including rotated-out
        ones, so the proxy can make sure none leaks into a response header or a log."""
        return set(self._secret_values)

    def _env(self, name: str) -> str:
        try:
            value = self._environ[name]
        except KeyError:
            raise SecretError(f"environment variable {name} is not set") from None
        value = _checked(value, f"environment variable {name}")
        self._remember(value)
        return value

    def _file(self, path: str) -> str:
        cached = self._files.get(path)
        if cached is None:
            value, stamp = _read(path)
            self._files[path] = _CachedFile(value, stamp, self._clock() + self._recheck_interval_s)
            self._remember(value)
            return value
        now = self._clock()
        if now >= cached.next_check:
            cached.next_check = now + self._recheck_interval_s
            self._refresh(path, cached)
        return cached.value

    def _refresh(self, path: str, cached: _CachedFile) -> None:
        try:
            if _stamp(os.stat(path)) == cached.stamp:
                return
            cached.value, cached.stamp = _read(path)
        except (OSError, SecretError) as e:
            # A rotation in progress or a broken mount: the last good value is still the best
            # credential we have, so keep serving it rather than failing every request.
            if not cached.warned:
                cached.warned = True
                logger.warning("secret file %s: %s; keeping the last good value", path, e)
            return
        cached.warned = False
        self._remember(cached.value)
        logger.info("secret file %s changed; using the new value", path)

    def _remember(self, value: str) -> None:
        if value:  # an empty string "occurs" in every header; it would flag them all
            self._secret_values.add(value)


def _read(path: str) -> tuple[str, tuple[int, int, int, int]]:
    """Read a secret file and the stamp of what was read (fstat, not a second stat, so a
    rotation between the two cannot pair new contents with the old stamp)."""
    try:
        with open(path, "rb") as f:
            stamp = _stamp(os.fstat(f.fileno()))
            data = f.read(_MAX_FILE_BYTES + 1)
    except OSError as e:
        raise SecretError(f"cannot read secret file {path}: {e.strerror or e}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise SecretError(f"secret file {path} is larger than {_MAX_FILE_BYTES} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise SecretError(f"secret file {path} is not valid UTF-8") from None
    # Files written with `echo` or by Kubernetes tooling usually end with a newline that is
    # not part of the secret.
    return _checked(text.rstrip("\r\n"), f"secret file {path}"), stamp


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _checked(value: str, what: str) -> str:
    if _FORBIDDEN_RE.search(value):
        raise SecretError(f"{what} contains CR, LF or NUL, which would split the header")
    return value
