"""`redis.url` parsing: every topology's scheme, and clear errors that never echo the URL."""

from __future__ import annotations

import pytest

from resilient_ambassador.core.redis_target import RedisTarget, parse_redis_target


@pytest.mark.parametrize(
    ("url", "mode", "tls"),
    [
        ("redis://redis:6379/0", "single", False),
        ("rediss://:pw@redis:6380/1", "single", True),
        ("unix:///run/redis.sock", "single", False),
    ],
)
def test_single_server_urls_are_left_to_redis_py(url: str, mode: str, tls: bool) -> None:
    assert parse_redis_target(url) == RedisTarget(mode, url, tls)  # type: ignore[arg-type]


def test_sentinel_url_names_the_sentinels_the_master_and_the_db() -> None:
    url = "sentinel://:p%40ss@s1:26379,s2,[::1]:26380/my-master/2"
    assert parse_redis_target(url) == RedisTarget(
        "sentinel",
        url,
        False,
        (("s1", 26379), ("s2", 26379), ("::1", 26380)),
        "my-master",
        2,
        None,
        "p@ss",
    )


def test_cluster_url_names_its_seeds() -> None:
    url = "rediss+cluster://app:secret@n1:7000,n2:7001"
    target = parse_redis_target(url)
    assert (target.mode, target.tls, target.nodes) == ("cluster", True, (("n1", 7000), ("n2", 7001)))
    assert (target.username, target.password, target.db) == ("app", "secret", 0)
    assert parse_redis_target("REDIS+CLUSTER://n1/0").nodes == (("n1", 6379),)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://:hunter2@redis:6379", "expected a URL like redis://"),
        ("sentinel://:hunter2@s1:26379", "expected sentinel://host:26379"),
        ("sentinel://:hunter2@s1:26379/m/x", "the database is a number"),
        ("sentinel://:hunter2@s1:26379/m/0/extra", "expected sentinel://host:26379"),
        ("redis+cluster://:hunter2@n1:7000/1", "database 0 only"),
        ("redis+cluster://:hunter2@n1:99999", "a port is a number"),
        ("redis+cluster://:hunter2@n1:7000,,n2", "expected host:port"),
        ("redis+cluster://:hunter2@n1?timeout=1", "no query"),
        ("redis+cluster://:hunter2@[::1", "expected [ipv6]:port"),
    ],
)
def test_bad_urls_say_why_without_the_url(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=r".") as info:
        parse_redis_target(url)
    assert why in str(info.value)
    assert "hunter2" not in str(info.value)
