"""Fixtures for the CI consistency tests (helpers live in ciparse.py)."""

from __future__ import annotations

import pytest

from ciparse import WORKFLOWS_DIR, RunStep, load_yaml, run_steps, workflow_paths


@pytest.fixture(scope="session")
def workflows() -> dict[str, dict]:
    paths = workflow_paths()
    assert paths, f"no workflows in {WORKFLOWS_DIR}"
    return {path.name: load_yaml(path) for path in paths}


@pytest.fixture(scope="session")
def all_run_steps() -> list[RunStep]:
    return [step for path in workflow_paths() for step in run_steps(path)]
