"""SecretResolver: env and file parts, Kubernetes-style rotation, and never leaking a value."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from resilient_ambassador.core.templates import parse_template
from resilient_ambassador.secrets import SecretError, SecretResolver

SECRET = "s3cr3t-canary-7f1d"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def k8s_secret_dir(root: Path, version: str, value: str) -> Path:
    """Lay out a mounted Secret as the kubelet does: `key -> ..data/key`, `..data -> ..<version>`."""
    (root / f"..{version}").mkdir()
    (root / f"..{version}" / "api-key").write_text(value)
    (root / "..data").symlink_to(f"..{version}")
    (root / "api-key").symlink_to("..data/api-key")
    return root / "api-key"


def k8s_rotate(root: Path, version: str, value: str) -> None:
    """Rotate as the kubelet does: write a new directory, atomically swap `..data` to it."""
    (root / f"..{version}").mkdir()
    (root / f"..{version}" / "api-key").write_text(value)
    (root / "..data_tmp").symlink_to(f"..{version}")
    os.replace(root / "..data_tmp", root / "..data")


def test_env_and_text_parts() -> None:
    resolver = SecretResolver(environ={"API_KEY": SECRET})
    assert resolver.resolve(parse_template("Key ${API_KEY}; $$ok")) == f"Key {SECRET}; $ok"


def test_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RA_TEST_TOKEN", SECRET)
    assert SecretResolver().resolve(parse_template("${RA_TEST_TOKEN}")) == SECRET


def test_missing_env_var_names_the_variable() -> None:
    resolver = SecretResolver(environ={})
    with pytest.raises(SecretError, match=r"^environment variable API_KEY is not set$"):
        resolver.check(parse_template("Bearer ${API_KEY}"))


@pytest.mark.parametrize("content", [f"{SECRET}\n", f"{SECRET}\r\n", f"{SECRET}\n\n", SECRET])
def test_file_trailing_newlines_are_stripped(tmp_path: Path, content: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    assert SecretResolver().resolve(parse_template(f"Bearer ${{file:{path}}}")) == f"Bearer {SECRET}"


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(SecretError) as info:
        SecretResolver().check(parse_template(f"${{file:{path}}}"))
    assert str(info.value) == f"cannot read secret file {path}: No such file or directory"


def test_non_utf8_and_oversized_files_are_refused(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * (64 * 1024 + 1))
    resolver = SecretResolver()
    with pytest.raises(SecretError, match="is not valid UTF-8"):
        resolver.check(parse_template(f"${{file:{binary}}}"))
    with pytest.raises(SecretError, match="is larger than 65536 bytes"):
        resolver.check(parse_template(f"${{file:{huge}}}"))


@pytest.mark.parametrize("bad", ["\r", "\n", "\0"])
def test_values_that_would_split_a_header_are_refused(tmp_path: Path, bad: str) -> None:
    value = f"{SECRET}{bad}X-Evil: 1"
    path = tmp_path / "token"
    path.write_text(value)
    resolver = SecretResolver(environ={"TOKEN": value})
    for source, what in [
        ("${TOKEN}", "environment variable TOKEN"),
        (f"${{file:{path}}}", f"secret file {path}"),
        (f"literal{bad}", "literal text"),
    ]:
        with pytest.raises(SecretError) as info:
            resolver.resolve(parse_template(source))
        assert str(info.value) == f"{what} contains CR, LF or NUL, which would split the header"
    assert resolver.secret_values() == set()


def test_kubernetes_symlink_swap_is_picked_up_after_the_recheck_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    path = k8s_secret_dir(tmp_path, "2024_01", "old-key\n")
    resolver = SecretResolver(clock=clock, recheck_interval_s=1.0)
    template = parse_template(f"${{file:{path}}}")
    assert resolver.resolve(template) == "old-key"

    k8s_rotate(tmp_path, "2024_02", "new-key\n")
    clock.now += 0.999
    assert resolver.resolve(template) == "old-key"  # not re-checked within the interval
    clock.now += 0.001
    assert resolver.resolve(template) == "new-key"
    assert resolver.secret_values() == {"old-key", "new-key"}  # a rotated-out key is still secret


def test_in_place_rewrite_is_picked_up(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "token"
    path.write_text("one")
    resolver = SecretResolver(clock=clock, recheck_interval_s=5.0)
    template = parse_template(f"${{file:{path}}}")
    assert resolver.resolve(template) == "one"
    path.write_text("three")
    clock.now += 4.0
    assert resolver.resolve(template) == "one"
    clock.now += 1.0
    assert resolver.resolve(template) == "three"


def test_vanished_file_keeps_last_good_value_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_ambassador.secrets")
    clock = FakeClock()
    path = tmp_path / "token"
    path.write_text(SECRET)
    resolver = SecretResolver(clock=clock)
    template = parse_template(f"${{file:{path}}}")
    assert resolver.resolve(template) == SECRET

    path.unlink()
    for _ in range(3):
        clock.now += 1.0
        assert resolver.resolve(template) == SECRET
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "resilient_ambassador.secrets"
    assert str(path) in warnings[0].getMessage()

    path.write_text("rotated")  # back, with a new value: used, and the next failure warns again
    clock.now += 1.0
    assert resolver.resolve(template) == "rotated"
    path.write_text("bad\nvalue")
    clock.now += 1.0
    assert resolver.resolve(template) == "rotated"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert all(SECRET not in r.getMessage() and "rotated" not in r.getMessage() for r in caplog.records)


def test_secret_values_holds_only_env_and_file_values(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-file\n")
    resolver = SecretResolver(environ={"A": "from-env", "EMPTY": ""})
    resolver.resolve(parse_template(f"Bearer ${{A}}:${{file:{path}}}:${{EMPTY}}"))
    resolver.resolve(parse_template("literal"))
    # The empty value is left out: it "occurs" in every header and would flag them all.
    assert resolver.secret_values() == {"from-env", "from-file"}
    resolver.secret_values().clear()  # a copy: callers cannot empty the resolver's set
    assert resolver.secret_values() == {"from-env", "from-file"}
