"""The README's quickstart commands are the ones CI runs, and the README points to docs/ci-cd.md."""

from __future__ import annotations

import re

import pytest

from ciparse import ROOT, logical_lines, run_steps, workflow_paths

README = ROOT / "README.md"
# Commands that set up a shell rather than exercise the project.
SETUP_COMMANDS = re.compile(r"^(git clone|cd|export|source|\.|sudo apt-get|apt-get)\b")


def section(markdown: str, heading: re.Pattern[str]) -> str:
    """The text under the first heading matching `heading`, up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^(#{1,6})\s+(.*)$", line)
        if match and heading.search(match.group(2)):
            level = len(match.group(1))
            body = []
            for following in lines[index + 1 :]:
                next_heading = re.match(r"^(#{1,6})\s", following)
                if next_heading and len(next_heading.group(1)) <= level:
                    break
                body.append(following)
            return "\n".join(body)
    return ""


def fenced_commands(markdown: str) -> list[str]:
    """Shell commands in the fenced code blocks of `markdown` (prompts and comments removed)."""
    commands, block = [], None
    for line in markdown.splitlines():
        fence = re.match(r"^\s*(```|~~~)\s*(\w*)", line)
        if fence:
            if block is None:
                block = [] if fence.group(2) in {"", "sh", "bash", "shell", "console", "zsh"} else False
            else:
                if block:
                    commands.extend(logical_lines("\n".join(block)))
                block = None
            continue
        if block is not None and block is not False:
            block.append(re.sub(r"^\s*\$\s+", "", line))
    commands = [re.sub(r"\s+#.*$", "", c) for c in commands]
    return [c for c in commands if not SETUP_COMMANDS.match(c)]


def quickstart_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return fenced_commands(section(text, re.compile(r"quick\s*-?\s*start", re.IGNORECASE)))


def ci_command_lines() -> set[str]:
    return {
        " ".join(line.split())
        for path in workflow_paths()
        for step in run_steps(path)
        for line in logical_lines(step.script)
    }


def runs_in_ci(command: str, lines: set[str]) -> bool:
    wanted = " ".join(command.split())
    return any(re.search(rf"(^|[\s;&|(]){re.escape(wanted)}(\s|$|[;&|)])", line) for line in lines)


def test_readme_has_a_quickstart_whose_commands_ci_runs():
    assert README.is_file(), "README.md is missing"
    commands = quickstart_commands()
    assert commands, "README.md has no Quickstart section with commands in a fenced code block"
    lines = ci_command_lines()
    missing = [c for c in commands if not runs_in_ci(c, lines)]
    assert not missing, f"README quickstart commands that no workflow runs: {missing}"


def test_readme_points_to_the_ci_cd_docs():
    assert README.is_file(), "README.md is missing"
    assert "docs/ci-cd.md" in README.read_text(encoding="utf-8"), "README.md has no link to docs/ci-cd.md"


SAMPLE = """# Project

## Quickstart

```bash
git clone https://example.invalid/p.git && cd p
$ make test
make run   # the whole stack
```

```python
print("not a command")
```

### Details
```
make lint
```

## Other
```
make images
```
"""


def test_quickstart_parser_reads_only_the_quickstart_section():
    body = section(SAMPLE, re.compile(r"quick\s*-?\s*start", re.IGNORECASE))
    assert fenced_commands(body) == ["make test", "make run", "make lint"]


@pytest.mark.parametrize(
    ("command", "line", "expected"),
    [
        ("make test", "make test", True),
        ("make test", 'make test PYTEST_ARGS="-x"', True),
        ("make test", "timeout 60 make test &", True),
        ("make test", "make test-k8s", False),
        ("make run", "make runner", False),
    ],
)
def test_runs_in_ci_matches_whole_commands(command, line, expected):
    assert runs_in_ci(command, {line}) is expected
