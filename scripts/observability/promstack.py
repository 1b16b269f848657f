"""A real Prometheus beside the local stack, configured from the rendered manifests.

- render(overlay): `kubectl kustomize k8s/overlays/<overlay>` (the pinned kubectl of
  `make k8s-tools` in .tools/k8s/bin, else kubectl on PATH) -> list of objects.
- Manifests(docs): the ScaledObjects' trigger queries and thresholds, the PrometheusRule
  groups and the ServiceMonitor / PodMonitor endpoints, exactly as rendered.
- scrape_config(...): one scrape job per monitor endpoint, as the Prometheus Operator
  generates them (path, params, interval, timeout), with the target labels the operator
  attaches (job = Service name for a ServiceMonitor, <namespace>/<name> for a PodMonitor;
  namespace, service, pod, container, endpoint), pointed at local processes.
- Prometheus: runs Debian's /usr/bin/prometheus on a free port (never the system service)
  with that config and the rules; query() / query_range() over its HTTP API.

Standard library + PyYAML only, so the test venv and the tools venv can both use it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jobs_devtools.stack import ROOT, Proc, free_port, wait_http


def kubectl() -> str:
    pinned = ROOT / ".tools" / "k8s" / "bin" / "kubectl"
    if pinned.exists():
        return str(pinned)
    found = shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found: run `make k8s-tools` (pinned kubectl in .tools/k8s/bin)")
    return found


def ensure_secrets(overlay: str) -> None:
    """Overlays with a secretGenerator need their (git-ignored) generated credentials."""
    gen = ROOT / "k8s" / "scripts" / "gen-secrets.py"
    if overlay in ("dev", "ci") and gen.exists():
        subprocess.run(["python3", str(gen), str(ROOT / "k8s" / "overlays" / overlay)], check=True,
                       capture_output=True)


def render(overlay: str = "ci") -> list[dict]:
    ensure_secrets(overlay)
    proc = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@dataclass(frozen=True)
class Trigger:
    scaled_object: str
    name: str
    query: str
    threshold: float
    metric_type: str


class Manifests:
    def __init__(self, docs: list[dict]):
        self.docs = docs

    def objects(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict:
        for d in self.objects(kind):
            if d["metadata"]["name"] == name:
                return d
        raise KeyError(f"{kind}/{name} not in the rendered manifests")

    @property
    def namespace(self) -> str:
        return self.get("ScaledObject", "main-app")["metadata"].get("namespace", "default")

    def scaled_objects(self) -> dict[str, dict]:
        return {d["metadata"]["name"]: d for d in self.objects("ScaledObject")}

    def triggers(self) -> list[Trigger]:
        out = []
        for so in self.objects("ScaledObject"):
            for trig in so["spec"]["triggers"]:
                if trig["type"] != "prometheus":
                    continue
                out.append(Trigger(so["metadata"]["name"], trig.get("name", ""), trig["metadata"]["query"],
                                   float(trig["metadata"]["threshold"]), trig.get("metricType", "AverageValue")))
        return out

    def rule_groups(self) -> list[dict]:
        groups = []
        for rule in self.objects("PrometheusRule"):
            groups.extend(rule["spec"]["groups"])
        return groups

    def recording_rules(self) -> dict[str, str]:
        return {r["record"]: r["expr"] for g in self.rule_groups() for r in g["rules"] if "record" in r}

    def alert_rules(self) -> dict[str, dict]:
        return {r["alert"]: r for g in self.rule_groups() for r in g["rules"] if "alert" in r}

    def monitors(self) -> list[dict]:
        return self.objects("ServiceMonitor") + self.objects("PodMonitor")


@dataclass
class Target:
    """A local process standing in for one pod."""

    address: str  # host:port
    pod: str
    container: str = ""


def scrape_configs(manifests: Manifests, targets: dict[str, list[Target]], interval: str | None = None) -> list[dict]:
    """targets: monitor name -> local targets. One scrape job per monitor endpoint."""
    namespace = manifests.namespace
    configs = []
    for monitor in manifests.monitors():
        name = monitor["metadata"]["name"]
        kind = monitor["kind"]
        endpoints = monitor["spec"].get("endpoints") or monitor["spec"].get("podMetricsEndpoints") or []
        local = targets.get(name)
        if not local:
            raise KeyError(f"no local target for {kind}/{name}")
        for i, ep in enumerate(endpoints):
            prefix = "serviceMonitor" if kind == "ServiceMonitor" else "podMonitor"
            labels = {
                "namespace": namespace,
                "endpoint": ep.get("port", ""),
                # ServiceMonitor: job = the Service's name; PodMonitor: <namespace>/<PodMonitor name>
                "job": name if kind == "ServiceMonitor" else f"{namespace}/{name}",
            }
            if kind == "ServiceMonitor":
                labels["service"] = name
            static = [{"targets": [t.address], "labels": {**labels, "pod": t.pod, "container": t.container or name}}
                      for t in local]
            job = {
                "job_name": f"{prefix}/{namespace}/{name}/{i}",
                "metrics_path": ep.get("path", "/metrics"),
                "scrape_interval": interval or ep.get("interval", "30s"),
                "scrape_timeout": ep.get("scrapeTimeout", "10s"),
                "static_configs": static,
            }
            if interval:
                job["scrape_timeout"] = min(_seconds(job["scrape_timeout"]), _seconds(interval))
                job["scrape_timeout"] = f"{job['scrape_timeout']:g}s"
            if ep.get("params"):
                job["params"] = ep["params"]
            configs.append(job)
    return configs


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * units[suffix]
    return float(duration)


@dataclass
class Prometheus:
    base_dir: Path
    scrape: list[dict]
    rule_groups: list[dict]
    evaluation_interval: str = "30s"  # the Prometheus Operator's default
    port: int = field(default_factory=free_port)
    binary: str = field(default_factory=lambda: shutil.which("prometheus") or "/usr/bin/prometheus")
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        rules = self.base_dir / "rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": self.rule_groups}, sort_keys=False))
        config = {
            "global": {"scrape_interval": "30s", "evaluation_interval": self.evaluation_interval},
            "rule_files": [str(rules)],
            "scrape_configs": self.scrape,
        }
        path = self.base_dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, timeout: float = 30.0) -> Prometheus:
        if not Path(self.binary).exists():
            raise RuntimeError("prometheus not installed: apt-get install --no-install-recommends prometheus")
        config = self.write_config()
        args = [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.base_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
                "--web.enable-lifecycle"]
        self.proc = Proc(args, dict(os.environ), self.base_dir / "prometheus.log", "prometheus").start()
        try:
            wait_http(f"{self.url}/-/ready", timeout, interval=0.2, proc=self.proc)
        except RuntimeError:
            raise RuntimeError(f"prometheus exited:\n{self.proc.output()[-3000:]}") from None
        except TimeoutError:
            raise TimeoutError("prometheus not ready") from None
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop(20)

    # ------------------------------------------------------------------ HTTP API
    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        data = self.api("query", query=expr, time=at)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str, at: float | None = None, **labels: str) -> float | None:
        """The single value of expr (optionally the series matching labels); None if empty."""
        result = [r for r in self.query(expr, at) if all(r["metric"].get(k) == v for k, v in labels.items())]
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{expr}: {len(result)} series, expected 1: {result}")
        return float(result[0]["value"][1])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_targets_up(self, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        targets: list[dict] = []
        while time.monotonic() < deadline:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return targets
            time.sleep(1)
        raise TimeoutError(f"not all targets up: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}")

    def rules(self) -> list[dict]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]
