"""Options and fixtures of the image suite (`make test-images`; not part of `make test`).

The images run against private RabbitMQ/Redis nodes (jobs_devtools.stack.PrivateStack)
started here, never the machine's own services. Every check prints a PASS/FAIL line;
reports/images/ gets the containers' and the broker's logs and summary.txt.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageslib import LABEL, Checks
from jobs_devtools.stack import PrivateStack


def pytest_addoption(parser):
    group = parser.getgroup("images")
    group.addoption("--main-image", default="main-app:local")
    group.addoption("--service-image", default="service-app:local")
    group.addoption("--docker", default="docker")
    group.addoption("--report-dir", default="reports/images")
    group.addoption("--skip-dev", action="store_true", help="skip the dev-target checks")


def pytest_configure(config):
    # A CI timeout still removes the containers and stops the private RabbitMQ/Redis.
    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)


@pytest.fixture(scope="session")
def report_dir(request) -> Path:
    path = Path(request.config.getoption("--report-dir"))
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob(f"{LABEL}-*.log"):  # logs of earlier runs
        old.unlink()
    shutil.rmtree(path / "rabbitmq-log", ignore_errors=True)
    return path


@pytest.fixture(scope="session")
def checks(report_dir) -> Iterator[Checks]:
    result = Checks()
    result.sizes: list[tuple[str, float, int]] = []
    yield result
    lines = result.lines + [f"image {i} {s:.1f} MB {n} layers" for i, s, n in result.sizes]
    (report_dir / "summary.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def check(checks) -> Iterator[Checks]:
    yield checks
    checks.failed = []  # a test that raised before verify(): its failures are reported already


@pytest.fixture(scope="session")
def stack(tmp_path_factory, report_dir) -> Iterator[PrivateStack]:
    with PrivateStack(tmp_path_factory.mktemp("images"), f"images-test-{os.getpid()}", log_level="info") as stack:
        yield stack
    if stack.rabbit.log_dir.exists():
        shutil.copytree(stack.rabbit.log_dir, report_dir / "rabbitmq-log", dirs_exist_ok=True)
