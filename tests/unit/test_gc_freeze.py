"""Both apps freeze what exists once they have started (gc.freeze), so that full garbage
collections, which stop every thread of the process, no longer scan it: before, one took
~30 ms in a main-app worker and stalled every request it was serving."""

import os
import subprocess
import sys

import pytest


def _frozen_at_start(code: str) -> int:
    env = {**os.environ, "METRICS_PORT": "0", "PROMETHEUS_MULTIPROC_DIR": "/nonexistent-unused"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.parametrize("app", ["main-app", "service-app"])
def test_startup_objects_are_frozen_out_of_garbage_collection(app):
    if app == "main-app":  # gunicorn's hook once a worker has loaded the app
        code = ("import gc, types; from main_app import gunicorn_conf;"
                "cfg = types.SimpleNamespace(reuse_port=False);"
                "gunicorn_conf.post_worker_init(types.SimpleNamespace(wsgi=object(), cfg=cfg));"
                "print(gc.get_freeze_count())")
    else:  # the entry point, up to where the worker starts consuming
        code = ("import gc; import service_app.__main__ as entry; from service_app import health;"
                "health.serve = lambda *a, **k: None;"
                "entry.Worker.run = lambda self: print(gc.get_freeze_count(), flush=True);"
                "entry.main()")
    before = _frozen_at_start("import gc; print(gc.get_freeze_count())")
    assert before == 0
    assert _frozen_at_start(code) > 10_000  # the imported libraries and the app's own objects
