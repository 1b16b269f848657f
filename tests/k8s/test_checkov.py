"""checkov (offline, --skip-download) on every rendered overlay/variant plus the
smoke-test Job. Tolerated failures are listed with reasons in checkov-skips.yaml."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import OVERLAYS, ROOT, VARIANTS

SKIPS = yaml.safe_load((Path(__file__).with_name("checkov-skips.yaml")).read_text())["skips"]


def checkov() -> str:
    path = ROOT / ".tools" / "k8s" / "bin" / "checkov"
    return str(path) if path.exists() else (shutil.which("checkov") or pytest.fail("checkov missing: make k8s-tools"))


def tolerated(check_id: str, resource: str, variant: str) -> bool:
    for skip in SKIPS:
        if skip["id"] != check_id:
            continue
        if "variants" in skip and variant not in skip["variants"]:
            continue
        if "resources" in skip and resource not in skip["resources"]:
            continue
        return True
    return False


def test_every_skip_has_a_reason():
    assert SKIPS
    for skip in SKIPS:
        assert skip["id"].startswith("CKV") and len(skip.get("reason", "")) > 40, skip


@pytest.mark.parametrize("variant", (*OVERLAYS, *VARIANTS))
def test_checkov(rendered, variant, tmp_path):
    docs = list(rendered[variant])
    if variant == "ci":  # the verify Job runs next to the ci deployment
        docs += [d for d in yaml.safe_load_all((ROOT / "k8s/verify/smoke-job.yaml").read_text()) if d]
    manifest = tmp_path / f"{variant}.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    proc = subprocess.run(
        [
            checkov(),
            "--skip-download",
            "--framework",
            "kubernetes",
            "--quiet",
            "--compact",
            "-o",
            "json",
            "-f",
            str(manifest),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.stdout.strip(), f"checkov produced no report:\n{proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(f["check_id"], f["resource"], f["check_name"]) for r in reports for f in r["results"]["failed_checks"]]
    passed = sum(r["summary"]["passed"] for r in reports)
    out = ROOT / "reports" / "k8s" / "checkov"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{variant}.json").write_text(proc.stdout)
    unexplained = [f for f in failed if not tolerated(f[0], f[1], variant)]
    assert passed > 100, f"checkov ran only {passed} checks"
    assert not unexplained, "failures not listed in tests/k8s/checkov-skips.yaml:\n" + "\n".join(map(str, unexplained))


def test_skips_are_still_needed(rendered):
    """A skip that no longer matches any failure is stale: remove it."""
    used = set()
    for path in (ROOT / "reports" / "k8s" / "checkov").glob("*.json"):
        report = json.loads(path.read_text())
        for r in report if isinstance(report, list) else [report]:
            used |= {f["check_id"] for f in r["results"]["failed_checks"]}
    if not used:
        pytest.skip("run together with test_checkov")
    assert {s["id"] for s in SKIPS} <= used
