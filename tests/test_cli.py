"""The command line as users run it: a real `python -m resilient_ambassador` process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from resilient_ambassador import __version__
from resilient_ambassador.cli import build_parser, config_for_run, main
from resilient_ambassador.config_loader import ConfigError
from resilient_ambassador.secrets import SecretResolver
from tests.support.client import RawConnection, http_request
from tests.support.process import CLI, run_command, wait_listening
from tests.support.process import free_port as _free_port
from tests.support.tcp import echo as tcp_echo
from tests.support.tcp import start_tcp_upstream
from tests.support.upstream import echo, parse_echo, start_fake_upstream

CANARY = "canary-credential-5d1e0b"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})}
    )


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"resilient-ambassador {__version__}"


def test_check_config_ok_and_broken(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "listeners:\n  - listen: 127.0.0.1:8000\n    routes:\n      - upstream: api\n"
        "upstreams:\n  api:\n    url: https://api.example.com/v1\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listeners:\n  - listen: 127.0.0.1:8000\n    routes:\n      - upstream: api\n"
        "upstreams:\n  api:\n    url: https://api.example.com\n    timeouts:\n      conect: 2s\n"
    )

    ok = _run("check-config", str(good))
    broken = _run("check-config", str(bad))

    assert ok.returncode == 0, ok.stderr
    assert broken.returncode == 2
    assert f"{bad}:9: upstreams.api.timeouts.conect: unknown key" in broken.stderr


def test_missing_secret_is_a_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE"}
    result = subprocess.run(
        [*CLI, "run", "--upstream", "http://127.0.0.1:9", "--header", "X-Api-Key: ${NOT_SET_ANYWHERE}"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 2
    assert "NOT_SET_ANYWHERE" in result.stderr


def test_port_in_use_is_a_runtime_failure() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run(
            "run",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr


async def test_one_liner_injects_secret_and_drains_on_sigterm(nursery: trio.Nursery, tmp_path: Path) -> None:
    upstream = await start_fake_upstream(nursery, default=echo)
    secret_file = tmp_path / "api-key"
    secret_file.write_text(CANARY + "\n")
    port = _free_port()
    admin_port = _free_port()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            run_command(
                port,
                admin_port,
                upstream.url(),
                "--header",
                f"X-Api-Key: ${{file:{secret_file}}}",
                "--log-level",
                "debug",
            ),
            stderr=stderr,
        )
        try:
            await wait_listening(port, process)
            response = await http_request(port, "GET", "/hello", headers=[("X-Api-Key", "app-guess")])
            healthz = await http_request(admin_port, "GET", "/healthz")
            config_doc = await http_request(admin_port, "GET", "/config")
            cmdline = await trio.Path(f"/proc/{process.pid}/cmdline").read_bytes()
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert response.status == 200
    seen = parse_echo(response.body)
    assert [v for k, v in seen["headers"] if k == "x-api-key"] == [CANARY]
    assert CANARY.encode() not in cmdline
    assert (healthz.status, healthz.body) == (200, b"ok\n")
    assert config_doc.status == 200
    assert CANARY.encode() not in config_doc.body
    assert b"${file:" in config_doc.body
    assert returncode == 0
    log = stderr_path.read_text()
    assert "SIGTERM received" in log
    assert f"admin listener on 127.0.0.1:{admin_port}" in log
    assert CANARY not in log


def test_policy_flags_apply_to_every_route_and_upstream() -> None:
    args = build_parser().parse_args(
        [
            "run",
            "--upstream",
            "http://127.0.0.1:9",
            "--retries",
            "3",
            "--breaker-failures",
            "7",
            "--breaker-reset",
            "5s",
        ]
    )
    config = config_for_run(args, SecretResolver())
    assert config.listeners[0].routes[0].retry.retries == 3
    breaker = config.upstreams["default"].breaker
    assert (breaker.enabled, breaker.failure_threshold, breaker.reset_timeout_s) == (True, 7, 5.0)

    off = config_for_run(
        build_parser().parse_args(["run", "--upstream", "http://127.0.0.1:9", "--breaker-failures", "0"]),
        SecretResolver(),
    )
    assert off.upstreams["default"].breaker.enabled is False


def test_bad_policy_flag_is_a_usage_error() -> None:
    result = _run("run", "--upstream", "http://127.0.0.1:9", "--breaker-reset", "soon")
    assert result.returncode == 2
    assert "--breaker-reset: expected a duration" in result.stderr


def test_redis_flag_shares_every_breaker() -> None:
    args = build_parser().parse_args(
        ["run", "--upstream", "http://127.0.0.1:9", "--redis", "redis://127.0.0.1:6379/0"]
    )
    config = config_for_run(args, SecretResolver())
    assert config.redis.url == "redis://127.0.0.1:6379/0"
    assert config.upstreams["default"].breaker.shared == "redis"


def test_admin_flag_sets_the_admin_listener() -> None:
    args = build_parser().parse_args(["run", "--upstream", "http://127.0.0.1:9", "--admin", "0.0.0.0:9911"])
    admin = config_for_run(args, SecretResolver()).admin
    assert (admin.enabled, admin.host, admin.port) == (True, "0.0.0.0", 9911)
    default = config_for_run(
        build_parser().parse_args(["run", "--upstream", "http://127.0.0.1:9"]), SecretResolver()
    )
    assert (default.admin.host, default.admin.port) == ("127.0.0.1", 9901)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--listen", "127.0.0.1:8000", "--admin", "127.0.0.1:8000"], "would share listener main's address"),
        (["--listen", "0.0.0.0:8000", "--admin", "127.0.0.1:8000"], "would share listener main's address"),
        (["--listen", "127.0.0.1:9901"], "would share listener main's address"),
        (["--admin", "nowhere"], "--admin 'nowhere': expected HOST:PORT"),
    ],
)
def test_admin_on_a_data_port_is_a_usage_error(flags: list[str], message: str) -> None:
    args = build_parser().parse_args(["run", "--upstream", "http://127.0.0.1:9", *flags])
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_for_run(args, SecretResolver())


def test_rate_limit_flags_limit_every_route() -> None:
    parse = build_parser().parse_args
    config = config_for_run(
        parse(["run", "--upstream", "http://127.0.0.1:9", "--rate-limit", "600/m"]), SecretResolver()
    )
    limit = config.listeners[0].routes[0].rate_limit
    assert limit is not None
    assert (limit.count, limit.period_s, limit.burst, limit.backend) == (600, 60.0, 10, "memory")

    shared = config_for_run(
        parse(
            [
                "run",
                "--upstream",
                "http://127.0.0.1:9",
                "--rate-limit",
                "50/s",
                "--burst",
                "5",
                "--redis",
                "redis://127.0.0.1:6379/0",
            ]
        ),
        SecretResolver(),
    )
    limit = shared.listeners[0].routes[0].rate_limit
    assert limit is not None
    assert (limit.count, limit.burst, limit.backend) == (50, 5, "redis")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate-limit", "lots"], "--rate-limit: expected a rate like 10/s"),
        (["--burst", "5"], "--burst: give --rate-limit too"),
        (["--rate-limit", "10/s", "--burst", "0"], "--burst: expected a whole number greater than 0"),
    ],
)
def test_bad_rate_limit_flags_are_usage_errors(flags: list[str], message: str) -> None:
    args = build_parser().parse_args(["run", "--upstream", "http://127.0.0.1:9", *flags])
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_for_run(args, SecretResolver())


async def test_one_liner_tcp_relays_and_drains_on_sigterm(nursery: trio.Nursery, tmp_path: Path) -> None:
    upstream = await start_tcp_upstream(nursery, tcp_echo)
    port, admin_port = _free_port(), _free_port()
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            run_command(port, admin_port, upstream.address()),
            stderr=stderr,
        )
        try:
            await wait_listening(port, process)
            async with await RawConnection.connect(port) as conn:
                await conn.send(b"relayed by the CLI")
                await conn.half_close()
                read = await conn.receive_until_closed()
            stats = await http_request(admin_port, "GET", "/stats")
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    assert (read.data, read.ending) == (b"relayed by the CLI", "eof")
    # _wait_listening's probe connection made a (silent) tunnel too.
    assert json.loads(stats.body)["tcp_listeners"]["main"]["bytes_to_client"] == len(read.data)
    assert returncode == 0
    assert (
        f"tcp listener main on 127.0.0.1:{port} relaying to {upstream.address()}" in stderr_path.read_text()
    )


def test_check_config_accepts_tcp_listeners(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).parent.parent / "examples" / "tcp-relay.yaml"
    assert main(["check-config", str(example)]) == 0
    assert "ok (2 listeners, 0 upstreams)" in capsys.readouterr().out


def test_breaker_flags_apply_to_tcp_listeners() -> None:
    args = build_parser().parse_args(
        ["run", "--upstream", "tls://api.example.com", "--breaker-failures", "2", "--breaker-reset", "3s"]
    )
    relay = config_for_run(args, SecretResolver()).listeners[0].relay
    assert relay is not None
    assert (relay.breaker.enabled, relay.breaker.failure_threshold, relay.breaker.reset_timeout_s) == (
        True,
        2,
        3.0,
    )


def test_tcp_upstream_flag_with_a_config_file_is_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "listeners: [{listen: 127.0.0.1:8000, routes: [{upstream: a}]}]\nupstreams: {a: {url: http://a}}\n"
    )
    args = build_parser().parse_args(["run", "--config", str(config), "--upstream", "tcp://a:1"])
    with pytest.raises(ConfigError, match="--upstream tcp:// or tls:// is for one-liner mode"):
        config_for_run(args, SecretResolver())
