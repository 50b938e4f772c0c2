from __future__ import annotations

from resilient_ambassador.core.templates import parse_template
from resilient_ambassador.net.upstream import ConnectionPool, UpstreamClient
from resilient_ambassador.secrets import SecretResolver
from tests.support.daemon import upstream_config


def _client(environ: dict[str, str], headers: tuple[tuple[str, str], ...]) -> UpstreamClient:
    config = upstream_config("http://127.0.0.1:9", headers=tuple((n, parse_template(v)) for n, v in headers))
    return UpstreamClient(config, ConnectionPool(config), SecretResolver(environ))


def test_no_injected_secret_means_no_partition() -> None:
    assert _client({}, (("X-Static", "literal"),)).credential_fingerprint() == ""


def test_follows_the_secret_and_never_shows_it() -> None:
    environ = {"API_KEY": "canary-secret-value"}
    client = _client(environ, (("X-Api-Key", "${API_KEY}"),))
    before = client.credential_fingerprint()
    assert before
    assert "canary" not in before
    environ["API_KEY"] = "rotated-value"
    after = client.credential_fingerprint()
    assert after
    assert after != before
