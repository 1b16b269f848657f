"""Read the lint skip list (.github/lint-skips.yaml): one list, every skip with its reason.

    python tests/ci/lint_skips.py .github/lint-skips.yaml checkov   # prints "ID1,ID2" (or nothing)

Exits non-zero when an entry lacks an id or a reason, so a skip cannot go unexplained.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


class SkipListError(ValueError):
    pass


def load_skips(path: Path, tool: str) -> list[dict[str, str]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise SkipListError(f"{path}: expected a mapping of tool -> list of skips")
    entries = data.get(tool) or []
    if not isinstance(entries, list):
        raise SkipListError(f"{path}: {tool}: expected a list")
    for entry in entries:
        if not isinstance(entry, dict) or not str(entry.get("id", "")).strip():
            raise SkipListError(f"{path}: {tool}: every skip needs an id: {entry!r}")
        if not str(entry.get("reason", "")).strip():
            raise SkipListError(f"{path}: {tool}: {entry['id']} has no reason")
    return entries


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        entries = load_skips(Path(argv[1]), argv[2])
    except SkipListError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(",".join(str(e["id"]).strip() for e in entries))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
