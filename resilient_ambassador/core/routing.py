"""Route selection: by Host (optional, exact) and longest path prefix on segment boundaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

from resilient_ambassador.core.config import RouteConfig


def _prefix_matches(prefix: bytes, path: bytes) -> bool:
    if prefix == b"/":
        return True
    return path == prefix or (path.startswith(prefix) and path[len(prefix)] == ord("/"))


def host_without_port(host: bytes) -> bytes:
    host = host.lower()
    if host.startswith(b"["):  # IPv6 literal: [::1]:8000
        return host.split(b"]", 1)[0] + b"]"
    return host.rsplit(b":", 1)[0] if b":" in host else host


@final
class Router:
    """Picks the route for a request. Routes with a Host match win over those without; among
    those, the longest prefix wins; ties keep config order."""

    __slots__ = ("_by_host", "_routes")

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        keyed = [
            (
                r.host is None,
                -len(r.prefix.rstrip("/")),
                index,
                r.prefix.rstrip("/").encode() or b"/",
                None if r.host is None else r.host.lower().encode(),
                r,
            )
            for index, r in enumerate(routes)
        ]
        keyed.sort(key=lambda k: (k[0], k[1], k[2]))
        self._routes = [(prefix, host, route) for _, _, _, prefix, host, route in keyed]
        self._by_host = any(host is not None for _, host, _ in self._routes)

    def match(self, host: bytes | None, target: bytes) -> tuple[RouteConfig, bytes] | None:
        """The route and the target rewritten for the upstream, or None (404)."""
        path = target.split(b"?", 1)[0]
        # Without a host-matched route (the usual sidecar), the Host header is not looked at.
        bare_host = host_without_port(host) if host is not None and self._by_host else None
        for prefix, route_host, route in self._routes:
            if route_host is not None and route_host != bare_host:
                continue
            if not _prefix_matches(prefix, path):
                continue
            return route, rewrite_target(route, prefix, target)
        return None


def rewrite_target(route: RouteConfig, matched_prefix: bytes, target: bytes) -> bytes:
    """Replace the matched prefix with the route's `rewrite_prefix`, keeping the rest."""
    if route.rewrite_prefix is None or target == b"*":
        return target
    rest = target if matched_prefix == b"/" else target[len(matched_prefix) :]
    joined = route.rewrite_prefix.encode().rstrip(b"/") + rest  # rest: "", "/..." or "?..."
    return joined if joined.startswith(b"/") else b"/" + joined
