"""Copy the table of the last chaos run (reports/chaos/chaos.md) into docs/guarantees.md,
between its chaos-table markers. Run by `make chaos-docs` after `make test-chaos`."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "reports" / "chaos" / "chaos.md"
RESULT = ROOT / "reports" / "chaos" / "chaos.json"
SCENARIOS = 8  # rows of a full run (1, 2, 3, 3b, 4, 5, 6, 7)
DOC = ROOT / "docs" / "guarantees.md"
START, END = "<!-- chaos-table:start -->", "<!-- chaos-table:end -->"


def main() -> int:
    if not REPORT.exists():
        print(f"{REPORT.relative_to(ROOT)} not found: run `make test-chaos` first", file=sys.stderr)
        return 1
    result = json.loads(RESULT.read_text())
    if "--force" not in sys.argv and (len(result["rows"]) != SCENARIOS or not result["all_passed"]):
        print(f"the last run had {len(result['rows'])} of {SCENARIOS} scenarios (all passed: {result['all_passed']}); "
              "run the whole `make test-chaos` first, or pass --force", file=sys.stderr)
        return 1
    report = REPORT.read_text().strip()
    doc = DOC.read_text()
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{report}\n{END}{tail}")
    print(f"updated {DOC.relative_to(ROOT)} from {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
