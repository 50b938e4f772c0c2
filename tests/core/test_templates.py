"""Template syntax: literal text, ${VAR}, ${file:/path} and $$."""

from __future__ import annotations

import pytest

from resilient_ambassador.core.templates import Template, TemplatePart, parse_template


def text(value: str) -> TemplatePart:
    return TemplatePart("text", value)


def env(name: str) -> TemplatePart:
    return TemplatePart("env", name)


def file(path: str) -> TemplatePart:
    return TemplatePart("file", path)


@pytest.mark.parametrize(
    ("source", "parts"),
    [
        ("", ()),
        ("plain", (text("plain"),)),
        ("${API_KEY}", (env("API_KEY"),)),
        ("${_x1}", (env("_x1"),)),
        (
            "Bearer ${file:/var/run/secrets/tmdb/token}",
            (text("Bearer "), file("/var/run/secrets/tmdb/token")),
        ),
        ("${A}${B}", (env("A"), env("B"))),
        ("${A}-${file:/k}!", (env("A"), text("-"), file("/k"), text("!"))),
        ("cost: $$5", (text("cost: $5"),)),
        ("$$${A}$$", (text("$"), env("A"), text("$"))),
        ("$${A}", (text("${A}"),)),  # an escaped $ makes the braces literal
        ("a}b{", (text("a}b{"),)),
    ],
)
def test_parse_template(source: str, parts: tuple[TemplatePart, ...]) -> None:
    assert parse_template(source) == Template(parts, source)


def test_source_is_kept_as_written() -> None:
    assert parse_template("Bearer $${x} ${TOKEN}").source == "Bearer $${x} ${TOKEN}"


def test_is_secret() -> None:
    assert not parse_template("literal $$").is_secret
    assert parse_template("x ${A}").is_secret
    assert parse_template("${file:/a}").is_secret


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("Bearer ${TOKEN", r"^unclosed '\$\{' at position 7$"),
        ("${", r"^unclosed '\$\{' at position 0$"),
        ("${}", r"^empty variable name in \$\{\}$"),
        ("${1A}", r"^invalid variable name '1A' in \$\{1A\}"),
        ("${A-B}", r"^invalid variable name 'A-B'"),
        ("${ A }", r"^invalid variable name ' A '"),
        ("${env:A}", r"^unknown reference kind 'env' in \$\{env:A\}"),
        ("${vault:secret/x}", r"^unknown reference kind 'vault'"),
        ("${file:relative/path}", r"needs an absolute path, got 'relative/path'$"),
        ("${file:}", r"needs an absolute path, got ''$"),
        ("Bearer $TOKEN", r"^lone '\$' at position 7: .* or \$\$ for a literal \$$"),
        ("trailing $", r"^lone '\$' at position 9"),
    ],
)
def test_parse_template_rejects(source: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_template(source)
