"""Workflows call Makefile targets, and every target they call exists (and is in `make help`)."""

from __future__ import annotations

import re

import pytest

from ciparse import (
    documented_targets,
    make_invocations,
    make_targets,
    makefile_targets,
    run_steps,
    workflow_paths,
)


def _called_targets() -> list[tuple[str, str, str]]:
    calls = []
    for path in workflow_paths():
        for step in run_steps(path):
            for args in make_invocations(step.script):
                for target in make_targets(args):
                    calls.append((path.name, step.job, target))
    return sorted(set(calls))


CALLED = _called_targets()


def test_workflows_call_make_targets():
    assert CALLED, "no workflow step runs `make <target>`"
    workflows_with_make = {workflow for workflow, _, _ in CALLED}
    assert {path.name for path in workflow_paths()} - {"images.yml"} <= workflows_with_make


@pytest.mark.parametrize(("workflow", "job", "target"), CALLED, ids=[f"{w}:{j}:{t}" for w, j, t in CALLED])
def test_called_target_exists(workflow, job, target):
    assert target in makefile_targets(), (
        f"{workflow} job {job!r} runs `make {target}`, but the Makefile (with mk/*.mk) has no such target"
    )


@pytest.mark.parametrize(("workflow", "job", "target"), CALLED, ids=[f"{w}:{j}:{t}" for w, j, t in CALLED])
def test_called_target_is_documented(workflow, job, target):
    assert target in documented_targets(), (
        f"{workflow} job {job!r} runs `make {target}`, which `make help` does not list (add `## description`)"
    )


# Tools the Makefile wraps: a workflow that runs them directly would drift from local runs.
RAW_TOOLS = ("pytest", "ruff", "yamllint", "actionlint", "checkov", "hadolint", "pip install", "pip3 install")


def test_run_steps_use_make_not_the_tools(all_run_steps):
    offenders = []
    for step in all_run_steps:
        for tool in RAW_TOOLS:
            if re.search(rf"(^|[\s;&|(/]){re.escape(tool)}(\s|$)", step.script, re.MULTILINE):
                offenders.append(f"{step.workflow}:{step.job}:{step.name}: runs {tool!r}")
    assert not offenders, "call the make target instead:\n" + "\n".join(offenders)


# The parser itself: what counts as a make call and what its goals are.
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("make lint", [["lint"]]),
        ("sudo make services-deps", [["services-deps"]]),
        ("setsid make run >run.log 2>&1 &", [["run"]]),
        ("make lint 2> err.log | tee out.log", [["lint"]]),
        ('make test PYTEST_ARGS="--junitxml=a b.xml"', [["test", "PYTEST_ARGS=--junitxml=a b.xml"]]),
        ("set -e\nmake cluster-up && make deploy PROFILE=ci", [["cluster-up"], ["deploy", "PROFILE=ci"]]),
        ("if true; then make \\\n  loadtest HOST=http://127.0.0.1:8000; fi", [["loadtest", "HOST=http://127.0.0.1:8000"]]),
        ("# make nothing\necho make-believe; cmake ..; automake", []),
    ],
)
def test_make_invocations(script, expected):
    assert make_invocations(script) == expected


@pytest.mark.parametrize(
    ("args", "goals"),
    [
        (["lint"], ["lint"]),
        (["-j2", "lint", "test", "V=1"], ["lint", "test"]),
        (["-C", "sub", "all"], ["all"]),
        ([], [".DEFAULT_GOAL"]),
    ],
)
def test_make_targets(args, goals):
    assert make_targets(args) == goals


def test_missing_target_is_not_reported_as_existing():
    assert "__ci_probe_no_such_target__" not in makefile_targets()
    assert "lint" in makefile_targets()
