"""Route selection and prefix rewriting."""

from __future__ import annotations

from resilient_ambassador.core.config import RouteConfig
from resilient_ambassador.core.routing import Router, host_without_port

ROUTES = [
    RouteConfig(upstream="default"),
    RouteConfig(upstream="movies", prefix="/movies", rewrite_prefix="/3/discover/movie"),
    RouteConfig(upstream="api", prefix="/api/", rewrite_prefix="/"),
    RouteConfig(upstream="api-v2", prefix="/api/v2"),
    RouteConfig(upstream="admin", prefix="/", host="admin.local"),
]


def _route(target: bytes, host: bytes | None = b"app") -> tuple[str, bytes]:
    match = Router(ROUTES).match(host, target)
    assert match is not None
    return match[0].upstream, match[1]


def test_longest_prefix_on_segment_boundaries() -> None:
    assert _route(b"/") == ("default", b"/")
    assert _route(b"/movies?page=2") == ("movies", b"/3/discover/movie?page=2")
    assert _route(b"/movies/12") == ("movies", b"/3/discover/movie/12")
    assert _route(b"/moviesx") == ("default", b"/moviesx")
    assert _route(b"/api/v2/x") == ("api-v2", b"/api/v2/x")
    assert _route(b"/api/v20") == ("api", b"/v20")
    assert _route(b"/api") == ("api", b"/")
    assert _route(b"/api?x=1") == ("api", b"/?x=1")


def test_host_routes_win_and_ignore_port_and_case() -> None:
    assert _route(b"/movies", b"Admin.Local:8080") == ("admin", b"/movies")
    assert _route(b"/movies", None) == ("movies", b"/3/discover/movie")


def test_no_match() -> None:
    assert Router([RouteConfig(upstream="a", prefix="/a")]).match(b"h", b"/b") is None


def test_host_without_port() -> None:
    assert host_without_port(b"Example.com:80") == b"example.com"
    assert host_without_port(b"[::1]:8000") == b"[::1]"
    assert host_without_port(b"[::1]") == b"[::1]"
