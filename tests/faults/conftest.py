"""Shares one FaultReport between the matrix's cases and prints it after the run."""

from __future__ import annotations

import pytest

from tests.faults.report import FaultReport

_REPORT = FaultReport()


@pytest.fixture
def fault_report() -> FaultReport:
    return _REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = _REPORT.lines()
    if lines:
        terminalreporter.section("redis fault matrix")
        for line in lines:
            terminalreporter.write_line(line)
