"""Suite-wide secret canary (issue #11): every value a `SecretResolver` resolves from the
environment or a file during a test is a secret of that test. When the test ends, no log
record it captured and no response header its h11 client received may contain one. (Bodies
are not checked suite-wide: tests' echo upstreams reflect what they received on purpose;
tests/net/test_secret_canary.py checks every sink, bodies included, with upstreams that echo
in headers.)

Also the session-wide fixtures of the real Redis topologies (tests/stores/redis_topologies.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from resilient_ambassador.secrets import SecretResolver
from tests.support.canary import SecretScan
from tests.support.client import RESPONSE_OBSERVERS, ClientResponse

pytest_plugins = ["tests.stores.redis_topologies"]

# Shorter values are too likely to occur by chance ("abc" in a header); real credentials and
# the suite's canaries are longer.
MIN_SECRET_CHARS = 8
_resolved: set[str] = set()


def pytest_configure(config: pytest.Config) -> None:
    remember = SecretResolver._remember

    def remember_for_the_canary(self: SecretResolver, value: str) -> None:
        remember(self, value)
        if len(value) >= MIN_SECRET_CHARS:
            _resolved.add(value)

    SecretResolver._remember = remember_for_the_canary  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _secret_canary(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    _resolved.clear()
    seen: list[ClientResponse] = []
    RESPONSE_OBSERVERS.append(seen.append)
    try:
        yield
    finally:
        RESPONSE_OBSERVERS.remove(seen.append)
    if not _resolved:
        return
    scan = SecretScan(*sorted(_resolved))
    scan.log_records(caplog.get_records("setup") + caplog.get_records("call"))
    for response in seen:
        scan.headers(response)
