"""The chaos suite's table: printed at the end of the run and written to reports/chaos/.

The fixtures (private RabbitMQ/Redis nodes, start_api, start_worker) come from
tests/conftest.py, which pytest applies to every directory under tests/.
"""

import os
import platform
from datetime import UTC, datetime

import chaoslib
import pytest


@pytest.fixture
def row(request) -> chaoslib.Row:
    """The table row of the running scenario; marked passed/failed when the test ends."""
    marker = request.node.get_closest_marker("scenario")
    entry = chaoslib.Row(scenario=marker.args[0] if marker else request.node.name)
    chaoslib.RESULTS.append(entry)
    return entry


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and "row" in getattr(item, "funcargs", {}):
        item.funcargs["row"].passed = report.passed


def pytest_configure(config):
    config.addinivalue_line("markers", "scenario(name): the chaos table row a test fills")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = chaoslib.RESULTS
    if not rows:
        return
    terminalreporter.section("chaos: lost-job accounting")
    terminalreporter.write_line(chaoslib.render_text(rows))
    for entry in rows:
        if entry.all_notes():
            terminalreporter.write_line(f"  {entry.scenario}: {entry.all_notes()}")
    meta = {
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
                   f"Python {platform.python_version()}",
        "all_passed": all(r.passed for r in rows),
    }
    chaoslib.write_reports(rows, meta)
    terminalreporter.write_line(f"written: {chaoslib.REPORT_DIR / 'chaos.md'} and chaos.json")
