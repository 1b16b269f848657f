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
