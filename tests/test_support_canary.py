"""The canary scanner finds a secret wherever a sink can hold it, so a clean scan means
something: Redis values of every type (a long string that DUMP compresses included), keys,
base64 forms, log records with arguments and tracebacks."""

from __future__ import annotations

import base64
import logging
import secrets
import sys

import pytest

from tests.stores.redis_server import redis_server
from tests.support.canary import SecretScan

SECRET = "canary-selftest-" + secrets.token_hex(4)


def _leaks(scan: SecretScan, url: str, prefix: str) -> bool:
    try:
        scan.redis_keys(url, prefix)
    except AssertionError:
        return True
    return False


def test_redis_scan_finds_the_secret_in_keys_and_every_value_type() -> None:
    scan = SecretScan(SECRET)
    with redis_server() as server:
        writes = [
            ("SET", "p:string", "x" * 500 + SECRET + "x" * 500),  # DUMP LZF-compresses this
            ("SADD", "p:set", "a", SECRET),
            ("ZADD", "p:zset", "1", SECRET),
            ("HSET", "p:hash", "field", SECRET),
            ("RPUSH", "p:list", SECRET),
            ("SET", f"p:{SECRET}", "v"),
        ]
        for command, key, *args in writes:
            server.command(command, key, *args)
            assert _leaks(scan, server.url, "p:"), key
            server.command("DEL", key)
        server.command("SET", "p:clean", "nothing here")
        server.command("SET", "other:" + SECRET, "outside the prefix")
        assert scan.redis_keys(server.url, "p:") == 1


def test_base64_forms_and_log_records_are_scanned() -> None:
    scan = SecretScan(SECRET)
    assert scan.found_in(b"Authorization: Basic " + base64.b64encode(SECRET.encode()))
    record = logging.LogRecord("x", logging.INFO, "f.py", 1, "value %s", (SECRET,), None)
    with pytest.raises(AssertionError, match="log record"):
        scan.log_records([record])
    try:
        raise ValueError(SECRET)
    except ValueError:
        failing = logging.LogRecord("x", logging.ERROR, "f.py", 1, "failed", (), sys.exc_info())
    with pytest.raises(AssertionError):
        scan.log_records([failing])
    assert scan.log_records([logging.LogRecord("x", logging.INFO, "f.py", 1, "fine", (), None)]) == 1
