#!/usr/bin/env python3
"""Delete what `make deploy` created, except what must outlive a redeploy.

`skaffold delete` deletes every object it renders, the `jobs` Namespace included, and
a Namespace takes with it the StatefulSets' PersistentVolumeClaims (RabbitMQ's queues,
Redis' job records) and, in prod, the Secrets created outside the repository. So this
renders the same manifests (`skaffold render`, offline, images as in the manifests),
drops the kinds in KEEP and deletes the rest with kubectl. The smoke-test Job that
`skaffold verify` creates is not rendered; it is deleted by its label.

  undeploy.py --profile ci [--skaffold BIN] [--kubectl BIN] [--dry-run]

--dry-run prints `Kind/name` of every object it would delete and deletes nothing
(tests/k8s runs it so with the real skaffold). Standard library only: `make undeploy`
runs it with the system python3.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Never deleted: the namespace (and with it everything made outside the repo) and any
# volume claim (StatefulSets keep theirs anyway; none is rendered today).
KEEP = {"Namespace", "PersistentVolumeClaim"}
NAMESPACE = "jobs"
SMOKE_TEST_SELECTOR = "app.kubernetes.io/name=smoke-test"


def documents(stream: str) -> list[str]:
    """Split a YAML stream as `skaffold render` writes it (top-level keys unindented)."""
    docs = re.split(r"^---[ \t]*$", stream, flags=re.M)
    return [d.strip("\n") + "\n" for d in docs if d.strip()]


def kind_and_name(doc: str) -> tuple[str, str]:
    kind = name = None
    in_metadata = False
    for line in doc.splitlines():
        if line.startswith("kind:"):
            kind = line.split(":", 1)[1].strip()
        if line.startswith("metadata:"):
            in_metadata = True
            continue
        if in_metadata:
            if line and not line.startswith(" "):
                in_metadata = False
            elif name is None and re.match(r"^  name:\s*\S", line):
                name = line.split(":", 1)[1].strip()
    if not kind or not name:
        raise SystemExit(f"undeploy: cannot read kind/name of a rendered object:\n{doc[:400]}")
    return kind, name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--skaffold", default="skaffold")
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()

    # The manifests go to a file: skaffold's stdout also carries hook output and notes.
    with tempfile.TemporaryDirectory(prefix="undeploy-") as tmp:
        out = Path(tmp) / "rendered.yaml"
        render = subprocess.run(
            [args.skaffold, "render", "-p", args.profile, "--offline=true", "--digest-source=none", "-o", str(out)],
            stdout=sys.stderr,
        )
        if render.returncode != 0 or not out.exists():
            raise SystemExit(f"undeploy: skaffold render -p {args.profile} failed")
        rendered = out.read_text()
    delete, kept = [], []
    for doc in documents(rendered):
        kind, name = kind_and_name(doc)
        (kept if kind in KEEP else delete).append((kind, name, doc))
    for kind, name, _ in kept:
        print(f"keeping {kind}/{name}", file=sys.stderr)
    if args.dry_run:
        for kind, name, _ in delete:
            print(f"{kind}/{name}")
        return 0
    manifest = "---\n".join(doc for _, _, doc in delete)
    subprocess.run(
        [args.kubectl, "delete", "--ignore-not-found", "--wait=false", "-f", "-"], input=manifest, text=True, check=True
    )
    subprocess.run(
        [args.kubectl, "-n", NAMESPACE, "delete", "job", "-l", SMOKE_TEST_SELECTOR, "--ignore-not-found"], check=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
