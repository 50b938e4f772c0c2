"""The pure parts of the benchmark harness (bench/run.py): no sockets, no processes, no clock.

Round order, medians, per-round ratios and differences, the targets and their verdicts, RSS
growth over a soak, and the text and Markdown renderings of a results document. Kept apart so
that tests/bench/ can check them quickly and deterministically; everything that measures
lives in run.py, loadgen.py and servers.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, final

Verdict = Literal["met", "NOT met", "not measured"]


def run_order(scenarios: Sequence[str], repeat: int) -> list[tuple[int, str]]:
    """(round, scenario) in running order: odd rounds forward, even rounds reversed, so
    neighbours in the list alternate which goes first, and drift over the run (a warming
    cache, a neighbour starting up) reaches every scenario alike."""
    order: list[tuple[int, str]] = []
    for round_no in range(1, repeat + 1):
        names = scenarios if round_no % 2 else list(reversed(scenarios))
        order.extend((round_no, name) for name in names)
    return order


def median(values: Sequence[float | None]) -> float:
    """The median of the finite values, NaN when there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def per_round_ratio(mine: Mapping[int, float], theirs: Mapping[int, float]) -> float:
    """Median over the rounds both measured of mine / theirs: the two runs of a round ran
    minutes apart at most, so machine drift between rounds cancels out of each ratio."""
    ratios = [
        mine[r] / theirs[r]
        for r in sorted(set(mine) & set(theirs))
        if math.isfinite(mine[r]) and math.isfinite(theirs[r]) and theirs[r] > 0
    ]
    return median(ratios)


def per_round_difference(mine: Mapping[int, float], theirs: Mapping[int, float]) -> float:
    """Median over the rounds both measured of mine - theirs (added latency over a baseline)."""
    return median([mine[r] - theirs[r] for r in sorted(set(mine) & set(theirs))])


def rss_growth(samples_kib: Sequence[int], settle_fraction: float = 0.1) -> float:
    """Relative RSS growth over a soak: the last sample against the first one taken after
    `settle_fraction` of the samples (start-up and the first requests allocate for good:
    pools, caches, interpreter warm-up). NaN with fewer than two samples."""
    if len(samples_kib) < 2:
        return math.nan
    baseline = samples_kib[min(int(len(samples_kib) * settle_fraction), len(samples_kib) - 2)]
    return (samples_kib[-1] - baseline) / baseline if baseline > 0 else math.nan


@final
@dataclass(frozen=True)
class Target:
    """One of issue #10's targets: a measured figure against a bound."""

    key: str
    title: str
    bound: float
    # "min": the value must be at least the bound (throughput ratios); "max": at most (latency, memory).
    direction: Literal["min", "max"]
    unit: str  # "x", "ms", "MiB", "%"

    def verdict(self, value: float | None) -> Verdict:
        if value is None or not math.isfinite(value):
            return "not measured"
        met = value >= self.bound if self.direction == "min" else value <= self.bound
        return "met" if met else "NOT met"

    def describe_bound(self) -> str:
        return f"{'>=' if self.direction == 'min' else '<='} {format_value(self.bound, self.unit)}"


TARGETS = (
    Target("passthrough_vs_reference", "daemon pass-through / reference forwarder (req/s)", 1.2, "min", "x"),
    Target("cache_memory_vs_dict_server", "memory cache hit / dict server (req/s)", 1.5, "min", "x"),
    Target("cache_redis_vs_memory", "Redis near-cache hit / memory hit (req/s)", 0.9, "min", "x"),
    Target("added_latency_p50_ms", "added latency over direct, p50, open loop", 0.3, "max", "ms"),
    Target("added_latency_p99_ms", "added latency over direct, p99, open loop", 2.0, "max", "ms"),
    Target("idle_rss_mib", "idle RSS of the daemon", 60.0, "max", "MiB"),
    Target("idle_connections_rss_mib", "RSS added by idle keep-alive connections", 50.0, "max", "MiB"),
    Target("soak_rss_growth_pct", "RSS growth over the soak", 10.0, "max", "%"),
    Target("workers_2_vs_1", "--workers 2 / one worker (req/s)", 1.7, "min", "x"),
)
# The built-in generator must drive the direct baseline at least this far above the daemon,
# else the generator (or the machine) and not the daemon may be what limits the daemon's rate.
GENERATOR_HEADROOM = 3.0


def format_value(value: float | None, unit: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.1f}%"
    if unit == "ms":
        return f"{value:.3f} ms"
    return f"{value:.1f} {unit}"


def evaluate_targets(
    values: Mapping[str, float | None], per_cpu: Mapping[str, float | None] | None = None
) -> list[dict[str, Any]]:
    """Every target with its measured value (None: its scenarios did not run) and verdict.

    `per_cpu`: for the throughput ratios, the same ratio in requests per CPU-second of the
    loaded process (the inverse ratio of CPU per request). A single-process server that is
    CPU-bound serves 1 / (CPU per request), and on a shared machine that figure moves less
    than req/s, which also depends on how much CPU the process got. Shown beside the
    verdict, which is on req/s as the issue states it."""
    rows = []
    for target in TARGETS:
        value = values.get(target.key)
        cpu_value = (per_cpu or {}).get(target.key)
        rows.append(
            {
                "key": target.key,
                "title": target.title,
                "value": value if value is not None and math.isfinite(value) else None,
                "unit": target.unit,
                "bound": target.bound,
                "direction": target.direction,
                "target": target.describe_bound(),
                "verdict": target.verdict(value),
                "per_cpu_value": cpu_value if cpu_value is not None and math.isfinite(cpu_value) else None,
            }
        )
    return rows


# --- rendering ------------------------------------------------------------------------------

# (heading, key in a scenario summary, digits): the columns of the results table.
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("req/s", "requests_per_s", 0),
    ("p50 ms", "p50_ms", 2),
    ("p99 ms", "p99_ms", 2),
    ("errors", "errors", 0),
    ("cpu us/req", "cpu_us_per_request", 0),
    ("open p50", "open_p50_ms", 2),
    ("open p99", "open_p99_ms", 2),
    ("open p99.9", "open_p99_9_ms", 2),
)


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _status(summary: Mapping[str, Any]) -> str:
    status = str(summary.get("status", "ok"))
    notes = [status if status == "ok" else f"{status}: {summary.get('reason', '')}"]
    if summary.get("open_saturated"):
        notes.append("open loop saturated")
    return "; ".join(notes)


def table_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    """The results table as cells: a heading row, then one row per throughput scenario."""
    rows = [["scenario", "runs", *(heading for heading, _key, _digits in COLUMNS), "status"]]
    for s in doc.get("scenarios", []):
        runs = f"{s.get('measured_runs', 0)}/{s.get('runs', 0)}"
        cells = [_cell(s.get(key), digits) for _heading, key, digits in COLUMNS]
        rows.append([s["name"], runs, *cells, _status(s)])
    return rows


def render_text(doc: Mapping[str, Any]) -> str:
    """The table, resources and targets as printed at the end of a run."""
    rows = table_rows(doc)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:], strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    rate = doc.get("meta", {}).get("rate_per_s")
    if rate:
        lines.append(
            f"(open p50/p99/p99.9: ms at a constant {rate:g} req/s, from each request's intended send time)"
        )
    headroom = {k: v for k, v in (doc.get("generator_headroom") or {}).items() if v is not None}
    if headroom:
        lines.append(
            "generator headroom (same generator, bare upstream / daemon; want >= "
            f"{GENERATOR_HEADROOM:g}x): " + ", ".join(f"{k} {v:.1f}x" for k, v in headroom.items())
        )
    redis_calls = {
        s["name"]: s["redis_calls_per_request"]
        for s in doc.get("scenarios", [])
        if s.get("redis_calls_per_request") is not None
    }
    if redis_calls:
        lines.append(
            "Redis round trips per request (the daemon's /stats over the closed-loop window): "
            + ", ".join(f"{name} {calls:.3f}" for name, calls in redis_calls.items())
        )
    resources = doc.get("resources") or {}
    if resources:
        lines.append("")
        lines.extend(f"{key}: {_resource_text(value)}" for key, value in resources.items())
    if doc.get("targets"):
        lines.append("")
        width = max(len(t["title"]) for t in doc["targets"])
        for t in doc["targets"]:
            lines.append(
                f"{t['title'].ljust(width)}  {format_value(t['value'], t['unit']):>10}"
                f"  target {t['target']:<10}  {t['verdict']}"
                + (f"  (per CPU-s {format_value(t['per_cpu_value'], 'x')})" if t.get("per_cpu_value") else "")
            )
    return "\n".join(lines)


def _resource_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {v}" for k, v in value.items() if not isinstance(v, list | dict))
    return str(value)


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The results document as Markdown: a conditions line, the table, resources, targets."""
    meta = doc.get("meta", {})
    lines = [
        f"# Benchmark run {meta.get('timestamp', '')}",
        "",
        f"{meta.get('cpu_count', '?')} CPUs ({meta.get('cpu_model', 'unknown CPU')}), "
        f"load average {meta.get('loadavg_before', '?')} before; git {meta.get('git', '?')}; "
        f"closed loop: {meta.get('generator', '?')}, {meta.get('connections', '?')} connections, "
        f"{meta.get('duration_s', '?')} s x {meta.get('repeat', '?')} rounds (medians); "
        f"open loop: built-in generator at {meta.get('rate_per_s', '?')} req/s.",
        "",
    ]
    rows = table_rows(doc)
    lines.append("| " + " | ".join(rows[0]) + " |")
    lines.append("|" + "|".join("---" for _ in rows[0]) + "|")
    lines.extend("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows[1:])
    headroom = {k: v for k, v in (doc.get("generator_headroom") or {}).items() if v is not None}
    if headroom:
        lines += [
            "",
            f"Generator headroom (want >= {GENERATOR_HEADROOM:g}x): "
            + ", ".join(f"{k} {v:.1f}x" for k, v in headroom.items()),
        ]
    resources = doc.get("resources") or {}
    if resources:
        lines += ["", "| resource | figures |", "|---|---|"]
        lines.extend(f"| {key} | {_resource_text(value)} |" for key, value in resources.items())
    if doc.get("targets"):
        lines += [
            "",
            "| target | measured | bound | verdict | per CPU-second |",
            "|---|---|---|---|---|",
        ]
        for t in doc["targets"]:
            verdict = f"**{t['verdict']}**" if t["verdict"] == "NOT met" else t["verdict"]
            per_cpu = format_value(t.get("per_cpu_value"), "x")
            value = format_value(t["value"], t["unit"])
            lines.append(f"| {t['title']} | {value} | {t['target']} | {verdict} | {per_cpu} |")
    warnings = doc.get("warnings") or []
    if warnings:
        lines += [""] + [f"- warning: {w}" for w in warnings]
    return "\n".join(lines) + "\n"
