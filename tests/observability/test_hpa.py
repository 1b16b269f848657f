"""The offline HPA algorithm (scripts/observability/hpa.py) against the worked examples of
the Kubernetes documentation ("Horizontal Pod Autoscaling": algorithm details, scaling
policies, stabilization window, default behavior) and against this repo's manifests."""

from __future__ import annotations

import pytest

from jobs_devtools.observability import hpa
from jobs_devtools.observability.hpa import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    Autoscaler,
    Config,
    Metric,
    Policy,
    Rules,
)

AVG = Metric("m", 0.1, kind="average")  # target 100m per pod


def test_doubles_when_metric_is_twice_the_target():
    # docs: current 200m, desired 100m -> the number of replicas doubles (200.0 / 100.0 == 2.0)
    assert hpa.replicas_for_metric(3, 0.2, AVG) == 6


def test_halves_when_metric_is_half_the_target():
    # docs: current 50m -> halve the number of replicas (50.0 / 100.0 == 0.5)
    assert hpa.replicas_for_metric(4, 0.05, AVG) == 2


def test_rounds_up():
    # desiredReplicas = ceil[currentReplicas * (currentMetricValue / desiredMetricValue)]
    assert hpa.replicas_for_metric(3, 0.13, AVG) == 4  # ceil(3.9)


@pytest.mark.parametrize("current, value, expected", [
    (5, 0.109, 5), (5, 0.111, 6),  # above: ceil(5 x 1.09) would be 6, the tolerance keeps 5
    (20, 0.092, 20), (20, 0.089, 18),  # below: ceil(20 x 0.92) would be 19, the tolerance keeps 20
])
def test_tolerance_skips_ratios_close_to_one(current, value, expected):
    # docs: if the ratio is sufficiently close to 1.0 (within the tolerance, 0.1 by default) the
    # control plane skips any scaling action.
    assert hpa.replicas_for_metric(current, value, AVG) == expected


def test_external_average_value_divides_the_total_by_the_target():
    # KEDA AverageValue triggers: the query returns the total; desired = ceil(total / target)
    metric = Metric("backlog", 20)
    assert hpa.replicas_for_metric(1, 60, metric) == 3
    assert hpa.replicas_for_metric(3, 61, metric) == 3  # ratio 61/60 within tolerance
    assert hpa.replicas_for_metric(3, 100, metric) == 5
    assert hpa.replicas_for_metric(5, 0, metric) == 0  # min/max are applied later


def test_largest_recommendation_over_metrics_wins():
    cfg = Config(1, 20, (Metric("a", 20), Metric("b", 0.7)), Rules(0, "Max", (Policy("Pods", 100, 15),)),
                 Rules(0, "Max", (Policy("Percent", 100, 15),)))
    scaler = Autoscaler(cfg, 2)
    assert scaler.sync(0, {"a": 20, "b": 2.8})["desired"] == 4  # max(ceil(1), ceil(4))


def _scale_down_to_10(policies_rules: Rules, start: int, syncs: int) -> list[int]:
    cfg = Config(1, 100, (Metric("m", 1),), DEFAULT_SCALE_UP, policies_rules)
    scaler = Autoscaler(cfg, start)
    seen = []
    for i in range(syncs):
        scaler.sync(i * 15.0, {"m": 10})  # metric total 10, target 1 -> 10 replicas wanted
        seen.append(scaler.replicas)
    return seen


def test_scaling_policies_example_80_replicas_down_to_10():
    # docs (Scaling policies): Pods 4 / 60 s and Percent 10 / 60 s, default selectPolicy Max.
    # "if there are 80 replicas and the target has to be scaled down to 10 replicas then during
    # the first step 8 replicas will be reduced. In the next iteration when the number of replicas
    # is 72, 10% of the pods is 7.2 but the number is rounded up to 8. [...] When the number of
    # replicas falls below 40 the first policy (Pods) is applied and 4 replicas will be reduced
    # at a time." (window 0 here, to look at the policies alone.)
    rules = Rules(0, "Max", (Policy("Pods", 4, 60), Policy("Percent", 10, 60)))
    seen = _scale_down_to_10(rules, 80, 4 * 20)
    per_minute = seen[::4]  # one sync every 15 s; a period is 60 s
    assert per_minute[:3] == [72, 64, 57]
    below_40 = [n for n in per_minute if n < 40]
    assert all(a - b == 4 for a, b in zip(below_40, below_40[1:], strict=False) if b > 10)
    assert seen[-1] == 10
    # never more than one step per period
    assert seen[1:4] == [72, 72, 72]


def test_select_policy_min_allows_at_most_5_pods_per_minute():
    # docs: "To ensure that no more than 5 Pods are removed per minute, you can add a second
    # scale-down policy with a fixed size of 5, and set selectPolicy to minimum."
    rules = Rules(0, "Min", (Policy("Percent", 10, 60), Policy("Pods", 5, 60)))
    seen = _scale_down_to_10(rules, 100, 8)
    assert seen[0] == 95 and seen[4] == 90  # 10 % of 100 would be 10; Pods allows 5
    rules_percent_only = Rules(0, "Max", (Policy("Percent", 10, 60),))
    assert _scale_down_to_10(rules_percent_only, 100, 1) == [90]  # docs: limit to 10 % per minute


def test_select_policy_disabled_never_scales_down():
    # docs: "selectPolicy: Disabled" turns scaling in that direction off
    assert _scale_down_to_10(Rules(0, "Disabled", (Policy("Percent", 100, 15),)), 30, 12) == [30] * 12


def test_default_scale_up_doubles_or_adds_4_pods_every_15_seconds():
    # docs (Default Behavior): scaleUp policies Percent 100 / 15 s and Pods 4 / 15 s, selectPolicy Max,
    # no stabilization window.
    cfg = Config(1, 100, (Metric("m", 1),))
    scaler = Autoscaler(cfg, 1)
    seen = [scaler.sync(i * 15.0, {"m": 1000})["desired"] for i in range(5)]
    assert seen == [5, 10, 20, 40, 80]  # max(1+4, 2), max(5+4, 10), ...


def test_default_scale_down_stabilization_window_is_5_minutes():
    # docs: the default scale-down window is 300 s: the highest recommendation of the last
    # 5 minutes is used, then scaling to the new value is allowed at once (Percent 100).
    cfg = Config(1, 100, (Metric("m", 1),), DEFAULT_SCALE_UP, DEFAULT_SCALE_DOWN)
    scaler = Autoscaler(cfg, 10)
    scaler.sync(0, {"m": 10})
    replicas = {t: scaler.sync(t, {"m": 2})["desired"] for t in range(15, 331, 15)}
    assert replicas[15] == 10 and replicas[285] == 10  # the recommendation of 10 at t=0 is still in the window
    assert replicas[300] == 2  # 300 s later it has left the window (the controller's cutoff is exclusive)


def test_stabilization_window_flattens_flapping():
    # docs (Stabilization window): with a window, a metric that flaps does not make the replica
    # count flap; the count follows the maximum recommendation of the window.
    rules = Rules(60, "Max", (Policy("Percent", 100, 15),))
    cfg = Config(1, 100, (Metric("m", 1),), Rules(0, "Max", (Policy("Percent", 100, 15),)), rules)
    scaler = Autoscaler(cfg, 4)
    seen = [scaler.sync(i * 15.0, {"m": 4 if i % 2 == 0 else 2})["desired"] for i in range(12)]
    assert seen == [4] * 12


def test_min_and_max_clamp():
    cfg = Config(2, 5, (Metric("m", 1),), Rules(0, "Max", (Policy("Pods", 100, 15),)),
                 Rules(0, "Max", (Policy("Pods", 100, 15),)))
    assert Autoscaler(cfg, 3).sync(0, {"m": 50})["desired"] == 5
    assert Autoscaler(cfg, 3).sync(0, {"m": 0})["desired"] == 2
    assert Autoscaler(cfg, 1).sync(0, {"m": 0})["desired"] == 2  # below min: to min, metrics ignored


def test_empty_metric_counts_as_zero():
    cfg = Config(1, 5, (Metric("m", 1),), Rules(0, "Max", (Policy("Pods", 100, 15),)),
                 Rules(0, "Max", (Policy("Pods", 100, 15),)))
    assert Autoscaler(cfg, 3).sync(0, {"m": None})["desired"] == 1


def test_simulate_uses_the_latest_sample_at_each_sync():
    cfg = Config(1, 10, (Metric("m", 10),), Rules(0, "Max", (Policy("Pods", 100, 15),)),
                 Rules(0, "Max", (Policy("Pods", 100, 15),)))
    out = hpa.simulate(cfg, [(0, {"m": 10}), (5, {"m": 50}), (40, {"m": 20})], start_replicas=1)
    assert [(d["t"], d["desired"]) for d in out] == [(0, 1), (15, 5), (30, 5)]


def test_config_from_this_repos_service_app_scaled_object():
    so = {
        "spec": {
            "minReplicaCount": 1, "maxReplicaCount": 20,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 30, "selectPolicy": "Max", "policies": [
                    {"type": "Percent", "value": 100, "periodSeconds": 30},
                    {"type": "Pods", "value": 4, "periodSeconds": 30}]},
                "scaleDown": {"stabilizationWindowSeconds": 300, "selectPolicy": "Min", "policies": [
                    {"type": "Pods", "value": 1, "periodSeconds": 60}]}}}},
            "triggers": [
                {"type": "prometheus", "name": "backlog", "metricType": "AverageValue",
                 "metadata": {"query": "q1", "threshold": "20"}},
                {"type": "prometheus", "name": "busy", "metricType": "AverageValue",
                 "metadata": {"query": "q2", "threshold": "0.7"}}],
        }
    }
    cfg = hpa.config_from_scaled_object(so)
    scaler = Autoscaler(cfg, 1)
    # backlog 400 -> 20 wanted; scale-up limited to max(1 x 2, 1 + 4) = 5 per 30 s, after a
    # 30 s stabilization window (the lowest recommendation of the last 30 s)
    seen = [scaler.sync(i * 15.0, {"backlog": 400, "busy": 1.0})["desired"] for i in range(8)]
    assert seen == [1, 1, 5, 5, 10, 10, 20, 20]
    # load gone: nothing for 300 s, then one pod per minute
    seen = [scaler.sync(120 + i * 15.0, {"backlog": 0, "busy": 0})["desired"] for i in range(30)]
    # the last recommendation of 20 was at t=105: it leaves the window at t=405 (i=19)
    assert seen[:19] == [20] * 19
    assert seen[19:24] == [19, 19, 19, 19, 18]
