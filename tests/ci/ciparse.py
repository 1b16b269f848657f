"""Parsing for the CI consistency tests: workflows, their `make` calls, the Makefile's targets."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = ROOT / ".github" / "workflows"

# A redirection with its target (`>file`, `2>&1`, `< in`): not an argument of the command.
_REDIRECTION_RE = re.compile(r"(?<!\S)\d*(?:>>|>|<)&?\s*[^\s;&|()]+")
# Words after which a new simple command starts (besides ; && || | ( and a new line).
_COMMAND_PREFIXES = {
    "then", "do", "else", "elif", "if", "while", "until", "!", "time", "sudo", "exec", "command", "setsid", "nohup",
}


@dataclass(frozen=True)
class RunStep:
    workflow: str
    job: str
    name: str
    script: str


def load_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def workflow_paths() -> list[Path]:
    return sorted([*WORKFLOWS_DIR.glob("*.yml"), *WORKFLOWS_DIR.glob("*.yaml")])


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the bare key `on` as True.
    value = workflow.get("on", workflow.get(True))
    if isinstance(value, str):
        return {value: None}
    if isinstance(value, list):
        return dict.fromkeys(value)
    return value or {}


def run_steps(path: Path) -> list[RunStep]:
    workflow = load_yaml(path)
    steps = []
    for job_id, job in (workflow.get("jobs") or {}).items():
        for index, step in enumerate(job.get("steps") or []):
            if "run" in step:
                steps.append(RunStep(path.name, job_id, step.get("name", f"step {index}"), step["run"]))
    return steps


def logical_lines(script: str) -> list[str]:
    """Shell lines with backslash continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    lines = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            lines.append(stripped)
    return lines


def make_invocations(script: str) -> list[list[str]]:
    """The argument lists of every `make` command in a shell script."""
    calls = []
    for line in logical_lines(script):
        line = _REDIRECTION_RE.sub(" ", line)
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes: not a line we can read, so not a make call
            continue
        command: list[str] = []
        for token in [*tokens, ";"]:
            if token and set(token) <= set(";&|()"):
                if command:
                    calls.append(command)
                command = []
            elif command and command[0] == "make":
                command.append(token)
            elif not command and token == "make":
                command = ["make"]
            elif not command and (token in _COMMAND_PREFIXES or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", token)):
                continue  # `sudo make`, `then make`, `VAR=value make`
            else:
                command = command or ["<other>"]
        calls = [c for c in calls if c[0] == "make"]
    return [c[1:] for c in calls]


def make_targets(args: list[str]) -> list[str]:
    """Goals among make arguments (not options, not VAR=value assignments)."""
    goals, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in {"-C", "-f", "-I", "-j", "-l", "-o", "-W", "--file", "--directory"}:
            skip_next = True
        elif not arg.startswith("-") and "=" not in arg:
            goals.append(arg)
    return goals or [".DEFAULT_GOAL"]


def _make_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEFILES"}}
    env["LC_ALL"] = "C"
    return env


@cache
def makefile_targets() -> frozenset[str]:
    """Every explicit target of the root Makefile (including mk/*.mk), from make's database."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-pRrq", "-f", "Makefile", "__ci_probe_no_such_target__"],
        cwd=ROOT, env=_make_env(), capture_output=True, text=True, timeout=120,
    ).stdout
    targets, not_a_target = set(), False
    for line in out.splitlines():
        if line.startswith("# Not a target:"):
            not_a_target = True
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.+/-]*):(?!=)", line)
        if match and not not_a_target:
            targets.add(match.group(1))
        if not line.startswith("#"):
            not_a_target = False
    return frozenset(targets)


@cache
def documented_targets() -> frozenset[str]:
    """Targets listed by `make help` (those with a `## description`)."""
    out = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=ROOT, env=_make_env(), capture_output=True, text=True, timeout=120,
    ).stdout
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    return frozenset(m.group(1) for m in re.finditer(r"^[ \t]+([A-Za-z0-9_.-]+)[ \t]{2,}", plain, re.MULTILINE))
