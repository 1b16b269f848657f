"""promtool check rules / test rules on the PrometheusRule as rendered by the overlays."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import OVERLAYS, find

HERE = Path(__file__).parent


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool missing: `make promtool` (apt-get install --no-install-recommends prometheus)")
    return path


def write_rules(docs, directory: Path) -> Path:
    rule = find(docs, "PrometheusRule", "jobs")
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_promtool_check_rules(rendered, overlay, tmp_path):
    path = write_rules(rendered[overlay], tmp_path)
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_test_rules(rendered, tmp_path):
    write_rules(rendered["ci"], tmp_path)
    shutil.copy(HERE / "promtool" / "rules_test.yaml", tmp_path / "rules_test.yaml")
    proc = subprocess.run(
        [promtool(), "test", "rules", "rules_test.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def run_promtool_expr_tests(directory: Path, series: list[dict], checks: list[dict]) -> subprocess.CompletedProcess:
    """`promtool test rules` on expressions alone (no rules), 1-minute samples."""
    (directory / "none.yaml").write_text("groups: []\n")
    test = {"rule_files": ["none.yaml"], "evaluation_interval": "30s",
            "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": checks}]}
    (directory / "expr_test.yaml").write_text(yaml.safe_dump(test, sort_keys=False))
    return subprocess.run([promtool(), "test", "rules", "expr_test.yaml"], cwd=directory, capture_output=True,
                          text=True, timeout=120)


def test_busy_ratio_signals_drop_a_deleted_worker_at_once(rendered, tmp_path):
    """A worker pod that is gone (its series marked stale, as Prometheus does when a target
    disappears) no longer counts in the busy-ratio trigger nor in the recording rule, although its
    last samples are still inside their 2-minute window: otherwise, right after a scale-in, the
    remaining workers would look busier than they are for up to 2 minutes."""
    svc = find(rendered["ci"], "ScaledObject", "service-app")["spec"]
    trigger = next(t for t in svc["triggers"] if t["name"] == "worker-busy-ratio")["metadata"]["query"]
    rule = next(r["expr"] for g in find(rendered["ci"], "PrometheusRule", "jobs")["spec"]["groups"]
                for r in g["rules"] if r.get("record") == "jobs:worker_busy_ratio:avg2m")
    series = [
        {"series": 'jobs_worker_busy_ratio{namespace="jobs",pod="worker-a"}', "values": "1x5 stale"},  # gone at 6m
        {"series": 'jobs_worker_busy_ratio{namespace="jobs",pod="worker-b"}', "values": "0.5x10"},
    ]
    checks = [
        {"expr": trigger, "eval_time": "4m", "exp_samples": [{"labels": "{}", "value": 1.5}]},
        {"expr": trigger, "eval_time": "6m30s", "exp_samples": [{"labels": "{}", "value": 0.5}]},
        {"expr": rule, "eval_time": "4m", "exp_samples": [{"labels": '{namespace="jobs"}', "value": 0.75}]},
        {"expr": rule, "eval_time": "6m30s", "exp_samples": [{"labels": '{namespace="jobs"}', "value": 0.5}]},
    ]
    proc = run_promtool_expr_tests(tmp_path, series, checks)
    assert proc.returncode == 0, proc.stdout + proc.stderr
