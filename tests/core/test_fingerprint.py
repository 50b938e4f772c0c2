from __future__ import annotations

from resilient_ambassador.core.fingerprint import fingerprint


def test_stable_and_fixed_length() -> None:
    a = fingerprint([b"key-123"], domain=b"credential")
    assert a == fingerprint([b"key-123"], domain=b"credential")
    assert len(a) == 32
    assert len(fingerprint([b"x" * 10_000], domain=b"credential")) == 32


def test_parts_are_length_prefixed() -> None:
    assert fingerprint([b"ab", b"c"], domain=b"d") != fingerprint([b"a", b"bc"], domain=b"d")


def test_domains_never_collide() -> None:
    assert fingerprint([b"v"], domain=b"cache") != fingerprint([b"v"], domain=b"ratelimit")


def test_hides_the_value() -> None:
    assert "key-123" not in fingerprint([b"key-123"], domain=b"credential")
