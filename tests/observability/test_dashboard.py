"""The Grafana dashboard: shipped as a sidecar ConfigMap, its target lines equal to the
rendered KEDA thresholds. (Its queries run on the real Prometheus in test_prometheus.py.)"""

from __future__ import annotations

import json
import re

import pytest

from jobs_devtools.observability import promstack
from jobs_devtools.stack import ROOT

DASHBOARD = ROOT / "k8s" / "components" / "monitoring" / "grafana-dashboard-jobs.json"
# legend text of a target line -> (ScaledObject, trigger)
TARGET_LINES = {
    "MAIN_APP_TARGET_RPS_PER_POD": ("main-app", "http-requests-per-pod"),
    "SERVICE_APP_TARGET_BACKLOG_PER_REPLICA": ("service-app", "queue-backlog-per-replica"),
    "SERVICE_APP_TARGET_BUSY_RATIO": ("service-app", "worker-busy-ratio"),
}


def dashboard_targets(dashboard: dict) -> list[dict]:
    return [t for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module", params=["dev", "ci", "prod"])
def rendered(request) -> promstack.Manifests:
    return promstack.Manifests(promstack.render(request.param))


def test_shipped_as_a_sidecar_configmap(rendered, dashboard):
    cm = rendered.get("ConfigMap", "jobs-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["jobs-scaling.json"]) == dashboard


def test_target_lines_equal_the_rendered_thresholds(rendered, dashboard):
    thresholds = {(t.scaled_object, t.name): t.threshold for t in rendered.triggers()}
    seen = set()
    for target in dashboard_targets(dashboard):
        for key, trigger in TARGET_LINES.items():
            if key in target.get("legendFormat", ""):
                value = float(re.fullmatch(r"vector\(([0-9.]+)\)", target["expr"]).group(1))
                assert value == thresholds[trigger], f"{key}: dashboard {value}, manifests {thresholds[trigger]}"
                seen.add(key)
    assert seen == set(TARGET_LINES)


def test_tells_the_scaling_story(dashboard):
    exprs = " ".join(t["expr"] for t in dashboard_targets(dashboard))
    for needle in ("jobs_api_http_requests_total", "jobs_api_http_request_duration_seconds_bucket",
                   "rabbitmq_detailed_queue_messages_ready", "jobs_worker_busy_ratio",
                   "kube_deployment_status_replicas_available", "jobs_worker_jobs_processed_total",
                   "jobs_worker_job_latency_seconds_bucket"):
        assert needle in exprs, needle
    assert all(t["datasource"]["uid"] == "${datasource}" for t in dashboard_targets(dashboard))
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
