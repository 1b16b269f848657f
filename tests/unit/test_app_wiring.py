"""main-app's Flask subclass: Flask's per-request coroutine check is answered once per function."""

import flask.app

from main_app.api import JobsApp


def test_each_function_is_checked_for_a_coroutine_once(monkeypatch):
    app = JobsApp(__name__)
    checks: list = []
    real = flask.app.iscoroutinefunction
    monkeypatch.setattr(flask.app, "iscoroutinefunction", lambda func: checks.append(func) or real(func))

    def view():
        return "ok"

    def hook():
        return None

    for _ in range(3):
        assert app.ensure_sync(view) is view
        assert app.ensure_sync(hook) is hook
    assert checks == [view, hook]
