"""The Kubernetes HorizontalPodAutoscaler algorithm, replayed offline.

A transcription of the controller's decision (pkg/controller/podautoscaler in
kubernetes/kubernetes, autoscaling/v2 with `behavior`), so that recorded metric
values can be turned into the replica curve a configuration would produce:

1. per metric: desired = ceil(current x metric / target), skipped when
   |metric / target - 1| <= tolerance (0.1); for KEDA's External metrics of type
   AverageValue the metric is the query's TOTAL, so desired = ceil(total / target).
   The largest desired count over all metrics wins.
2. stabilisation: the recommendation is held between the lowest recommendation of the
   scale-up window and the highest of the scale-down window.
3. rate limits: `behavior` policies (Pods / Percent per periodSeconds, selectPolicy
   Max / Min / Disabled) measured against the scale events of the last period; then
   minReplicas / maxReplicas.

No Kubernetes import: the preview and its tests run anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

TOLERANCE = 0.1
SYNC_PERIOD_SECONDS = 15.0


@dataclass(frozen=True)
class Policy:
    type: str  # "Pods" | "Percent"
    value: int
    period_seconds: int


@dataclass(frozen=True)
class Rules:
    stabilization_window_seconds: int
    select_policy: str  # "Max" | "Min" | "Disabled"
    policies: tuple[Policy, ...]


# Defaults of autoscaling/v2 (the HPA documentation's "Default Behavior").
DEFAULT_SCALE_UP = Rules(0, "Max", (Policy("Percent", 100, 15), Policy("Pods", 4, 15)))
DEFAULT_SCALE_DOWN = Rules(300, "Max", (Policy("Percent", 100, 15),))


def rules_from_spec(spec: Mapping | None, default: Rules) -> Rules:
    """HPAScalingRules (a dict as in the manifest) -> Rules; missing fields take the defaults."""
    if not spec:
        return default
    policies = tuple(Policy(p["type"], int(p["value"]), int(p["periodSeconds"])) for p in spec.get("policies", []))
    return Rules(
        stabilization_window_seconds=int(spec.get("stabilizationWindowSeconds", default.stabilization_window_seconds)),
        select_policy=spec.get("selectPolicy", "Max"),
        policies=policies or default.policies,
    )


@dataclass(frozen=True)
class Metric:
    """One trigger. kind 'external-total': KEDA AverageValue (value = total over pods);
    kind 'average': a per-pod average (Pods metric, or Resource utilisation)."""

    name: str
    target: float
    kind: str = "external-total"


@dataclass(frozen=True)
class Config:
    min_replicas: int
    max_replicas: int
    metrics: tuple[Metric, ...]
    scale_up: Rules = DEFAULT_SCALE_UP
    scale_down: Rules = DEFAULT_SCALE_DOWN
    tolerance: float = TOLERANCE


def replicas_for_metric(current: int, value: float, metric: Metric, tolerance: float = TOLERANCE) -> int:
    """Step 1 for one metric (replica_calculator.go)."""
    if current <= 0:
        current = 1
    if metric.kind == "external-total":
        # GetExternalPerPodMetricReplicas: usageRatio = total / (target x current)
        ratio = value / (metric.target * current)
        if abs(1.0 - ratio) <= tolerance:
            return current
        return math.ceil(value / metric.target)
    if metric.kind == "average":
        ratio = value / metric.target
        if abs(1.0 - ratio) <= tolerance:
            return current
        return math.ceil(ratio * current)
    raise ValueError(f"unknown metric kind {metric.kind!r}")


@dataclass
class _Event:
    t: float
    change: int


@dataclass
class Autoscaler:
    """One HPA's state across syncs (recommendations and scale events)."""

    config: Config
    replicas: int
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    up_events: list[_Event] = field(default_factory=list)
    down_events: list[_Event] = field(default_factory=list)

    def sync(self, t: float, values: Mapping[str, float | None]) -> dict:
        """One controller sync at time t (seconds) with the metric values seen then.
        Returns a dict describing the decision and applies it to self.replicas."""
        cfg = self.config
        current = self.replicas
        per_metric: dict[str, int] = {}
        if current > cfg.max_replicas:
            desired = cfg.max_replicas
        elif current < cfg.min_replicas:
            desired = cfg.min_replicas
        else:
            metric_desired = 0
            for metric in cfg.metrics:
                value = values.get(metric.name)
                if value is None:  # KEDA ignoreNullValues: an empty result counts as 0
                    value = 0.0
                per_metric[metric.name] = replicas_for_metric(current, value, metric, cfg.tolerance)
                metric_desired = max(metric_desired, per_metric[metric.name])
            desired = self._normalize(t, current, metric_desired)
        if desired != current:
            events = self.up_events if desired > current else self.down_events
            events.append(_Event(t, abs(desired - current)))
            self.replicas = desired
        return {"t": t, "current": current, "desired": desired, "per_metric": per_metric}

    # --- normalizeDesiredReplicasWithBehaviors --------------------------------------------
    def _normalize(self, t: float, current: int, prenormalized: int) -> int:
        if not self.recommendations:  # maybeInitScaleDownStabilizationWindow
            self.recommendations.append((t, current))
        stabilized = self._stabilize(t, current, prenormalized)
        return self._rate_limit(t, current, stabilized)

    def _stabilize(self, t: float, current: int, desired: int) -> int:
        up_cutoff = t - self.config.scale_up.stabilization_window_seconds
        down_cutoff = t - self.config.scale_down.stabilization_window_seconds
        up_rec = desired
        down_rec = desired
        old_index = None
        for i, (ts, rec) in enumerate(self.recommendations):
            if ts > up_cutoff:
                up_rec = min(rec, up_rec)
            if ts > down_cutoff:
                down_rec = max(rec, down_rec)
            if ts < up_cutoff and ts < down_cutoff:
                old_index = i
        recommendation = current
        if recommendation < up_rec:
            recommendation = up_rec
        if recommendation > down_rec:
            recommendation = down_rec
        if old_index is not None:
            self.recommendations[old_index] = (t, desired)
        else:
            self.recommendations.append((t, desired))
        return recommendation

    def _rate_limit(self, t: float, current: int, desired: int) -> int:
        cfg = self.config
        if desired > current:
            limit = scale_up_limit(t, current, self.up_events, self.down_events, cfg.scale_up)
            limit = max(limit, current)
            return min(desired, cfg.max_replicas, limit)
        if desired < current:
            limit = scale_down_limit(t, current, self.up_events, self.down_events, cfg.scale_down)
            limit = min(limit, current)
            return max(desired, cfg.min_replicas, limit)
        return desired


def _changed_in_period(t: float, period: int, events: Iterable[_Event]) -> int:
    return sum(e.change for e in events if e.t > t - period)


def scale_up_limit(t: float, current: int, up: Sequence[_Event], down: Sequence[_Event], rules: Rules) -> int:
    if rules.select_policy == "Disabled":
        return current
    pick, result = (min, math.inf) if rules.select_policy == "Min" else (max, -math.inf)
    for p in rules.policies:
        start = current - _changed_in_period(t, p.period_seconds, up) + _changed_in_period(t, p.period_seconds, down)
        proposed = start + p.value if p.type == "Pods" else math.ceil(start * (1 + p.value / 100))
        result = pick(result, proposed)
    return int(result)


def scale_down_limit(t: float, current: int, up: Sequence[_Event], down: Sequence[_Event], rules: Rules) -> int:
    if rules.select_policy == "Disabled":
        return current
    pick, result = (max, -math.inf) if rules.select_policy == "Min" else (min, math.inf)
    for p in rules.policies:
        start = current - _changed_in_period(t, p.period_seconds, up) + _changed_in_period(t, p.period_seconds, down)
        proposed = start - p.value if p.type == "Pods" else int(start * (1 - p.value / 100))
        result = pick(result, proposed)
    return int(result)


def simulate(config: Config, series: Sequence[tuple[float, Mapping[str, float | None]]],
             start_replicas: int | None = None, sync_period: float = SYNC_PERIOD_SECONDS) -> list[dict]:
    """Replay samples [(t, {metric: value})] (sorted by t) through one HPA, syncing every
    sync_period seconds with the latest sample at or before each sync."""
    if not series:
        return []
    scaler = Autoscaler(config, start_replicas if start_replicas is not None else config.min_replicas)
    out = []
    t = series[0][0]
    end = series[-1][0]
    i = 0
    while t <= end + 1e-9:
        while i + 1 < len(series) and series[i + 1][0] <= t + 1e-9:
            i += 1
        decision = scaler.sync(t, series[i][1])
        decision["values"] = dict(series[i][1])
        out.append(decision)
        t += sync_period
    return out


def config_from_scaled_object(obj: Mapping) -> Config:
    """A KEDA ScaledObject (rendered manifest) -> Config: min/max, triggers, behavior."""
    spec = obj["spec"]
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
    metrics = []
    for trig in spec["triggers"]:
        metric_type = trig.get("metricType", "AverageValue")
        if metric_type != "AverageValue":
            raise ValueError(f"trigger {trig.get('name')}: metricType {metric_type} is not modelled")
        metrics.append(Metric(trig.get("name") or trig["type"], float(trig["metadata"]["threshold"])))
    return Config(
        min_replicas=int(spec.get("minReplicaCount", 0)),
        max_replicas=int(spec.get("maxReplicaCount", 100)),
        metrics=tuple(metrics),
        scale_up=rules_from_spec(behavior.get("scaleUp"), DEFAULT_SCALE_UP),
        scale_down=rules_from_spec(behavior.get("scaleDown"), DEFAULT_SCALE_DOWN),
    )
