"""Round order, ratios, verdicts and the renderings of bench/harness.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
from harness import (
    TARGETS,
    Target,
    evaluate_targets,
    median,
    per_round_difference,
    per_round_ratio,
    render_markdown,
    render_text,
    rss_growth,
    run_order,
)
from run import parse_target, unexpected_stderr


def test_rounds_alternate_their_order() -> None:
    assert run_order(["a", "b", "c"], 3) == [
        (1, "a"), (1, "b"), (1, "c"),
        (2, "c"), (2, "b"), (2, "a"),
        (3, "a"), (3, "b"), (3, "c"),
    ]  # fmt: skip


def test_median_leaves_out_what_was_not_measured() -> None:
    assert median([3.0, None, 1.0, math.nan, 2.0]) == 2.0
    assert math.isnan(median([None, math.nan]))


def test_ratios_and_differences_pair_runs_by_round() -> None:
    daemon = {1: 1200.0, 2: 900.0, 3: 1100.0}
    reference = {1: 1000.0, 2: 1000.0, 4: 500.0}  # round 3 failed, round 4 has no daemon run
    # Per round 1.2 and 0.9: the median of two is their mean. The medians of the two series
    # (1100 / 1000 = 1.1) would mix rounds that ran under different machine conditions.
    assert per_round_ratio(daemon, reference) == pytest.approx(1.05)
    assert per_round_difference({1: 1.5, 2: 1.1}, {1: 1.0, 2: 1.0, 3: 9.0}) == pytest.approx(0.3)
    assert math.isnan(per_round_ratio({1: 5.0}, {2: 5.0}))
    assert math.isnan(per_round_ratio({1: 5.0}, {1: 0.0}))


def test_rss_growth_is_measured_after_the_warm_up() -> None:
    # Start-up allocates for good (the first 10% of samples), then the level must hold.
    assert rss_growth([30_000] + [45_000] * 8 + [45_900]) == pytest.approx(0.02)
    assert rss_growth([40_000, 44_000]) == pytest.approx(0.1)
    assert math.isnan(rss_growth([40_000]))


def test_a_target_is_met_at_its_bound_and_not_measured_without_a_value() -> None:
    at_least = Target("k", "ratio", 1.2, "min", "x")
    at_most = Target("k", "latency", 0.3, "max", "ms")
    assert at_least.verdict(1.2) == "met"
    assert at_least.verdict(1.19) == "NOT met"
    assert at_most.verdict(0.3) == "met"
    assert at_most.verdict(0.31) == "NOT met"
    assert at_most.verdict(None) == at_most.verdict(math.nan) == "not measured"
    assert at_least.describe_bound() == ">= 1.20x"
    assert at_most.describe_bound() == "<= 0.300 ms"


def test_every_target_is_reported_even_when_its_scenarios_did_not_run() -> None:
    rows = evaluate_targets({"passthrough_vs_reference": 0.57, "idle_rss_mib": 44.9})
    assert [row["key"] for row in rows] == [target.key for target in TARGETS]
    by_key = {row["key"]: row for row in rows}
    assert by_key["passthrough_vs_reference"]["verdict"] == "NOT met"
    assert by_key["idle_rss_mib"]["verdict"] == "met"
    assert by_key["workers_2_vs_1"] == {**by_key["workers_2_vs_1"], "value": None, "verdict": "not measured"}


def _document() -> dict[str, Any]:
    return {
        "meta": {"timestamp": "2026-11-23T15:00:00+00:00", "cpu_count": 2, "rate_per_s": 1000.0},
        "scenarios": [
            {
                "name": "direct",
                "runs": 1,
                "measured_runs": 1,
                "status": "ok",
                "requests_per_s": 9200.0,
                "p50_ms": 2.95,
                "p99_ms": 11.74,
                "errors": 0,
                "cpu_us_per_request": 48.0,
                "open_p50_ms": 0.99,
                "open_p99_ms": 8.21,
                "open_p99_9_ms": 9.82,
            },
            {
                "name": "nginx",
                "runs": 1,
                "measured_runs": 0,
                "status": "skipped",
                "reason": "not | installed",
            },
        ],
        "resources": {"idle-rss": {"rss_mib": 44.9, "after": "start-up"}},
        "targets": evaluate_targets({"passthrough_vs_reference": 0.2}, {"passthrough_vs_reference": 0.25}),
        "warnings": ["the machine was busy"],
        "generator_headroom": {"direct/daemon-1k": 8.04, "direct-64k/daemon-64k": None},
    }


def test_markdown_has_the_table_resources_targets_and_warnings() -> None:
    markdown = render_markdown(_document())
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| scenario"))
    assert header.count("|") == lines[lines.index(header) + 1].count("|")
    assert "| direct | 1/1 | 9200 | 2.95 | 11.74 | 0 | 48 | 0.99 | 8.21 | 9.82 | ok |" in lines
    # A cell never breaks the table: a pipe in a reason is replaced.
    assert "| nginx | 0/1 | - | - | - | - | - | - | - | - | skipped: not / installed |" in lines
    assert "| idle-rss | rss_mib 44.9, after start-up |" in lines
    assert (
        "| daemon pass-through / reference forwarder (req/s) | 0.20x | >= 1.20x | **NOT met** | 0.25x |"
        in lines
    )
    assert "| idle RSS of the daemon | - | <= 60.0 MiB | not measured | - |" in lines
    assert "- warning: the machine was busy" in lines
    assert "Generator headroom (want >= 3x): direct/daemon-1k 8.0x" in lines


def test_text_rendering_lines_up_the_table_and_prints_each_verdict() -> None:
    text = render_text(_document())
    table = text.split("\n\n")[0].splitlines()
    assert table[0].startswith("scenario")
    assert table[0].index("req/s") + len("req/s") == table[1].index("9200") + len("9200")
    assert "target >= 1.20x" in text
    assert "NOT met  (per CPU-s 0.25x)" in text
    assert "NOT met" in text
    assert "not measured" in text


def test_target_urls_must_be_plain_http() -> None:
    assert parse_target("http://example.test:8080/v1/items?id=3") == ("example.test", 8080, "/v1/items?id=3")
    assert parse_target("http://127.0.0.1") == ("127.0.0.1", 80, "/")
    with pytest.raises(ValueError, match="only http://"):
        parse_target("https://example.test/")
    with pytest.raises(ValueError, match="no host"):
        parse_target("http:///path")


def test_an_open_breaker_may_log_warnings_but_nothing_else_may() -> None:
    warning = "2026-11-23 15:10:51,207 WARNING resilient_ambassador.breaker: circuit breaker opened"
    error = "2026-11-23 15:10:51,208 ERROR resilient_ambassador.server: boom"
    assert unexpected_stderr("breaker-open", f"{warning}\n{error}\n") == [error]
    assert unexpected_stderr("daemon-1k", f"{warning}\n") == [warning]
    assert unexpected_stderr("nginx", "nginx: [warn] low fds\n") == []
