"""The fault matrix as a table at the end of the run: worst latency and recovery per case."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import final


@final
@dataclass
class FaultReport:
    """Figures the matrix records per (feature, fault); printed by conftest's summary hook."""

    rows: dict[tuple[str, str], tuple[float, float, int, float, float]] = field(default_factory=dict)

    def record(
        self,
        feature: str,
        fault: str,
        worst_s: float,
        recovery_s: float,
        requests: int,
        after_s: float,
        loop_lag_s: float,
    ) -> None:
        """`worst_s` in the fault window, `after_s` the worst after recovery; `loop_lag_s`
        the event loop's worst stall in the window (the whole process, not one request)."""
        self.rows[(feature, fault)] = (worst_s, recovery_s, requests, after_s, loop_lag_s)

    def lines(self) -> list[str]:
        if not self.rows:
            return []
        out = [
            f"{'feature':<12}{'fault':<15}{'requests':>9}{'worst ms':>10}{'loop lag ms':>13}"
            f"{'recovery ms':>13}{'after ms':>10}"
        ]
        for (feature, fault), (worst_s, recovery_s, requests, after_s, lag_s) in sorted(self.rows.items()):
            out.append(
                f"{feature:<12}{fault:<15}{requests:>9}{worst_s * 1000:>10.0f}{lag_s * 1000:>13.0f}"
                f"{recovery_s * 1000:>13.0f}{after_s * 1000:>10.0f}"
            )
        return out
