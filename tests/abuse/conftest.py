"""A real gunicorn main-app per module, on the session's private RabbitMQ and Redis nodes
(the `rabbit` and `redis_node` fixtures of tests/conftest.py), with two clients' tokens.

Runs from the abuse tool venv (.tools/abuse), where the apps are installed too.
"""

from collections.abc import Iterator

import pytest
from abuselib import Gunicorn, start_gunicorn, stop_gunicorn


@pytest.fixture(scope="module")
def api(rabbit, redis_node, tmp_path_factory) -> Iterator[Gunicorn]:
    """main-app under gunicorn with the default limits. After the module: still up, no worker
    replaced (a crash would show as a new pid), no traceback in its log."""
    server = start_gunicorn(rabbit.url, redis_node.url, tmp_path_factory.mktemp("abuse"))
    pids = server.worker_pids()
    yield server
    try:
        assert server.alive(), "main-app died"
        assert server.worker_pids() == pids, f"a gunicorn worker was replaced (crashed?):\n{server.output()[-3000:]}"
        assert "Traceback" not in server.output(), server.output()[-5000:]
    finally:
        stop_gunicorn(server)
