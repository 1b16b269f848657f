"""A failure that repeats with every request while a dependency is down is logged once per
period, with the count of those left out, not once per request."""

import logging
import time

from main_app.submission import _ThrottledWarning


def test_one_warning_per_period_and_the_rest_counted_into_the_next(caplog):
    warn = _ThrottledWarning(period=0.2)
    with caplog.at_level(logging.WARNING, logger="main_app.submission"):
        for n in range(50):
            warn("job %s not accepted: %s", f"job-{n}", "not connected")
        time.sleep(0.25)
        warn("job %s not accepted: %s", "job-late", "not connected")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "job job-0 not accepted: not connected",
        "job job-late not accepted: not connected (and 49 more like it since the last such warning)",
    ]
