"""Render every overlay and validate each object strictly, then check the invariants
the design relies on (security profile, probes, autoscaling ownership, HA broker)."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import OVERLAYS, ROOT, VARIANTS, WORKLOAD_KINDS, ensure_secrets, find, pod_spec, render_dir

K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_FILES = {
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("keda.sh", "TriggerAuthentication"): "keda.sh_triggerauthentications.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
ALL = (*OVERLAYS, *VARIANTS)
APPS = ("main-app", "service-app")


def crd_key(obj: dict) -> tuple[str, str]:
    return obj["apiVersion"].split("/")[0], obj["kind"]


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_objects_valid_strict(rendered, variant, version):
    """kubernetes-validate strict=True: unknown fields, unknown kinds and removed API
    versions fail. Custom resources are checked against their CRDs below."""
    errors = []
    for obj in rendered[variant]:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if crd_key(obj) not in CRD_FILES:
                errors.append(
                    f"{obj['apiVersion']} {obj['kind']}/{obj['metadata']['name']}: no schema in Kubernetes {version}"
                )
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_validator_is_strict():
    """Negative controls: the validator really rejects what it should."""
    pdb = {
        "apiVersion": "policy/v1beta1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "x"},
        "spec": {"maxUnavailable": 1},
    }
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # removed in 1.25
        kubernetes_validate.validate(pdb, "1.30.0", strict=True)
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, "1.30.0", strict=True)


def _strict(schema):
    """CRD structural schemas let the API server prune unknown fields silently; make
    them an error instead (a typo in a ScaledObject would otherwise vanish)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _crd_schema(schemas_dir: Path, group: str, kind: str, version: str):
    crd = yaml.safe_load((schemas_dir / "crds" / CRD_FILES[(group, kind)]).read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v.get("served", True), f"{group}/{version} {kind} is not served"
            return _strict(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{group}/{version} {kind}: version not in the CRD")


@pytest.mark.parametrize("variant", ALL)
def test_custom_resources_match_crds(rendered, variant, schemas_dir):
    errors = []
    count = 0
    for obj in rendered[variant]:
        if crd_key(obj) not in CRD_FILES:
            continue
        count += 1
        group, version = obj["apiVersion"].split("/")
        schema = _crd_schema(schemas_dir, group, obj["kind"], version)
        for err in jsonschema.Draft7Validator(schema).iter_errors(obj):
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {err.message} at {list(err.absolute_path)}")
    assert count, "no custom resources rendered"
    assert not errors, "\n".join(errors)


def test_crd_validation_catches_typos(schemas_dir):
    schema = _crd_schema(schemas_dir, "keda.sh", "ScaledObject", "v1alpha1")
    bad = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {"scaleTargetRef": {"name": "x"}, "maxReplicas": 3, "triggers": [{"type": "cpu", "metadata": {}}]},
    }
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))


@pytest.mark.parametrize("variant", ALL)
def test_workloads_restricted_pod_security(rendered, variant):
    problems = []
    for obj in rendered[variant]:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(obj)
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        psc = spec.get("securityContext", {})
        if not psc.get("runAsNonRoot"):
            problems.append(f"{name}: pod runAsNonRoot")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccomp RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: automountServiceAccountToken false")
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}/{c['name']}: allowPrivilegeEscalation false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{name}/{c['name']}: drop ALL capabilities")
            ro = sc.get("readOnlyRootFilesystem")
            # dev only: live_update writes synced sources into the app containers.
            if not ro and not (variant == "dev" and c["name"] in APPS):
                problems.append(f"{name}/{c['name']}: readOnlyRootFilesystem")
            res = c.get("resources", {})
            for key in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(key, {}):
                        problems.append(f"{name}/{c['name']}: {key}.{r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("variant", ALL)
def test_service_accounts_do_not_automount(rendered, variant):
    sas = [o for o in rendered[variant] if o["kind"] == "ServiceAccount"]
    assert sas
    assert all(sa.get("automountServiceAccountToken") is False for sa in sas)


@pytest.mark.parametrize("variant", ALL)
def test_probes_and_spread(rendered, variant):
    for obj in rendered[variant]:
        if obj["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        spec = pod_spec(obj)
        for c in spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{obj['metadata']['name']}/{c['name']} lacks {probe}"
        assert spec.get("topologySpreadConstraints") or obj["metadata"]["name"] == "redis", obj["metadata"]["name"]


@pytest.mark.parametrize("variant", ALL)
def test_autoscaled_deployments_have_no_replicas(rendered, variant):
    """An HPA/KEDA owns the count; spec.replicas would reset it on every apply."""
    docs = rendered[variant]
    scalers = [o for o in docs if o["kind"] in {"ScaledObject", "HorizontalPodAutoscaler"}]
    targets = {o["spec"]["scaleTargetRef"]["name"] for o in scalers}
    assert targets == set(APPS), targets
    for app in APPS:
        assert "replicas" not in find(docs, "Deployment", app)["spec"]
    kinds = {o["kind"] for o in scalers}
    assert len(kinds) == 1, f"both KEDA and plain HPA in {variant}: {kinds}"


@pytest.mark.parametrize("variant", ALL)
def test_worker_grace_period_exceeds_drain(rendered, variant):
    docs = rendered[variant]
    dep = find(docs, "Deployment", "service-app")
    cm = find(
        docs,
        "ConfigMap",
        next(
            o["metadata"]["name"]
            for o in docs
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("service-app-config")
        ),
    )
    drain = int(cm["data"]["SHUTDOWN_GRACE_SECONDS"])
    assert pod_spec(dep)["terminationGracePeriodSeconds"] > drain + 5


@pytest.mark.parametrize("variant", ALL)
def test_pdbs_select_pods(rendered, variant):
    docs = rendered[variant]
    pdbs = [o for o in docs if o["kind"] == "PodDisruptionBudget"]
    workloads = [o for o in docs if o["kind"] in {"Deployment", "StatefulSet"}]
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert any(all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items()) for p in pdbs), (
            f"no PDB for {w['metadata']['name']}"
        )


@pytest.mark.parametrize("variant", ALL)
def test_unready_app_pods_can_be_evicted_but_not_unready_broker_nodes(rendered, variant):
    """The apps' pods turn unready together when a backend is down: their PDBs must still let a
    drain evict them. RabbitMQ's must not: an unready node there may be one a quorum needs."""
    docs = rendered[variant]
    for app in ("main-app", "service-app"):
        assert find(docs, "PodDisruptionBudget", app)["spec"].get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
    rabbit = find(docs, "PodDisruptionBudget", "rabbitmq")["spec"]
    assert rabbit.get("unhealthyPodEvictionPolicy", "IfHealthyBudget") == "IfHealthyBudget"


@pytest.mark.parametrize("variant", ALL)
def test_network_policies_default_deny_and_cover_ports(rendered, variant):
    docs = rendered[variant]
    pols = [o for o in docs if o["kind"] == "NetworkPolicy"]
    deny = [
        p
        for p in pols
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny policy"
    # Every container port that something must reach is opened by some ingress rule.
    opened = {}
    for p in pols:
        for rule in p["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                opened.setdefault(p["metadata"]["name"], set()).add(port["port"])
    needed = {"main-app": {8000, 9100}, "service-app": {9101}, "rabbitmq": {5672, 15692, 4369, 25672}}
    if any(o["kind"] == "StatefulSet" and o["metadata"]["name"] == "redis" for o in docs):
        needed["redis"] = {6379}
    for app, ports in needed.items():
        allowed = set().union(*(v for k, v in opened.items() if k.startswith(app)))
        assert ports <= allowed, f"{app}: ports {ports - allowed} never allowed in"


def _targets(docs):
    return (
        find(docs, "ConfigMap", "scaling-targets")
        if any(o["kind"] == "ConfigMap" and o["metadata"]["name"] == "scaling-targets" for o in docs)
        else None
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_targets_come_from_one_place(rendered, overlay):
    """The local-config ConfigMap is not deployed, and its values reached the scalers."""
    docs = rendered[overlay]
    assert _targets(docs) is None, "scaling-targets must stay out of the cluster"
    base = yaml.safe_load((Path(__file__).resolve().parents[2] / "k8s/base/scaling-targets.yaml").read_text())["data"]
    overrides = {}
    comp = Path(__file__).resolve().parents[2] / f"k8s/overlays/{overlay}/scaling/kustomization.yaml"
    for gen in yaml.safe_load(comp.read_text()).get("configMapGenerator", []):
        overrides.update(dict(lit.split("=", 1) for lit in gen.get("literals", [])))
    values = {**base, **overrides}
    main = find(docs, "ScaledObject", "main-app")["spec"]
    svc = find(docs, "ScaledObject", "service-app")["spec"]
    assert main["minReplicaCount"] == int(values["MAIN_APP_MIN_REPLICAS"])
    assert main["maxReplicaCount"] == int(values["MAIN_APP_MAX_REPLICAS"])
    assert svc["minReplicaCount"] == int(values["SERVICE_APP_MIN_REPLICAS"])
    assert svc["maxReplicaCount"] == int(values["SERVICE_APP_MAX_REPLICAS"])
    trig = {t["name"]: t["metadata"] for t in main["triggers"] + svc["triggers"]}
    assert trig["http-requests-per-pod"]["threshold"] == values["MAIN_APP_TARGET_RPS_PER_POD"]
    assert trig["queue-backlog-per-replica"]["threshold"] == values["SERVICE_APP_TARGET_BACKLOG_PER_REPLICA"]
    assert trig["worker-busy-ratio"]["threshold"] == values["SERVICE_APP_TARGET_BUSY_RATIO"]
    assert {t["serverAddress"] for t in trig.values()} == {values["PROMETHEUS_URL"]}
    for so in (main, svc):
        behavior = so["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    rules = find(docs, "PrometheusRule", "jobs")["spec"]["groups"]
    exprs = {r["alert"]: r["expr"] for g in rules for r in g["rules"] if "alert" in r}
    assert exprs["JobsBacklogTooOld"].endswith(" > " + values["ALERT_BACKLOG_AGE_SECONDS"])
    assert exprs["JobsApiHighErrorRate"].endswith(" > " + values["ALERT_ERROR_RATIO"])


def test_hpa_variant_uses_targets(rendered):
    docs = rendered["hpa"]
    base = yaml.safe_load((Path(__file__).resolve().parents[2] / "k8s/base/scaling-targets.yaml").read_text())["data"]
    hpa = find(docs, "HorizontalPodAutoscaler", "main-app")["spec"]
    assert hpa["minReplicas"] == int(base["MAIN_APP_MIN_REPLICAS"])
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == int(base["MAIN_APP_TARGET_CPU_PERCENT"])
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_prod_rabbitmq_is_a_three_node_cluster(rendered):
    docs = rendered["prod"]
    sts = find(docs, "StatefulSet", "rabbitmq")
    spec = pod_spec(sts)
    assert sts["spec"]["replicas"] == 3
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    pdb = find(docs, "PodDisruptionBudget", "rabbitmq")
    assert pdb["spec"]["maxUnavailable"] == 1
    cm_name = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")
    cm = find(docs, "ConfigMap", cm_name)
    assert "rabbitmq_peer_discovery_k8s" in cm["data"]["enabled_plugins"]
    assert "cluster_formation.peer_discovery_backend = k8s" in cm["data"]["20-cluster.conf"]
    mounted = {i["key"] for v in spec["volumes"] if v["name"] == "config" for i in v["configMap"]["items"]}
    assert {"10-base.conf", "20-cluster.conf"} <= mounted
    headless = find(docs, "Service", "rabbitmq-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert sts["spec"]["serviceName"] == "rabbitmq-headless"
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["RABBITMQ_USE_LONGNAME"] == "true" and "rabbitmq-headless" in env["RABBITMQ_NODENAME"]
    # Secrets are expected from outside the repo in prod.
    assert not [o for o in docs if o["kind"] == "Secret"]


@pytest.mark.parametrize("overlay", ("dev", "ci"))
def test_local_overlays_single_broker_and_generated_secrets(rendered, overlay):
    docs = rendered[overlay]
    assert find(docs, "StatefulSet", "rabbitmq")["spec"]["replicas"] == 1
    secrets = {
        o["metadata"]["name"].rsplit("-", 1)[0]
        if o["metadata"]["name"] != "main-app-api-tokens"
        else o["metadata"]["name"]
        for o in docs
        if o["kind"] == "Secret"
    }
    assert secrets == {
        "rabbitmq-credentials",
        "redis-credentials",
        "main-app-credentials",
        "service-app-credentials",
        "main-app-api-tokens",
        "rabbitmq-definitions",
    }


def test_no_default_credentials_in_repo():
    root = Path(__file__).resolve().parents[2]
    for path in list((root / "k8s").rglob("*.yaml")) + list((root / "rabbitmq").rglob("*")):
        if "secrets" in path.parts or not path.is_file():
            continue
        text = path.read_text()
        assert "guest:guest" not in text and "RABBITMQ_DEFAULT_PASS=" not in text, path


@pytest.mark.parametrize("variant", ALL)
def test_mounted_secrets_are_readable_by_the_pod_user(rendered, variant):
    """Secret/ConfigMap volumes are owned by root (group = fsGroup): a non-root pod can
    read them only through the group or world bits."""
    docs = list(rendered[variant])
    docs += [
        d
        for d in yaml.safe_load_all((Path(__file__).resolve().parents[2] / "k8s/verify/smoke-job.yaml").read_text())
        if d
    ]
    for obj in docs:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(obj)
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        for vol in spec.get("volumes", []):
            src = vol.get("secret") or vol.get("configMap")
            if src is None:
                continue
            mode = src.get("defaultMode", 0o644)
            readable = bool(mode & 0o004) or (fs_group is not None and bool(mode & 0o040))
            assert readable, (
                f"{obj['kind']}/{obj['metadata']['name']} volume {vol['name']}: mode {oct(mode)}, fsGroup {fs_group}"
            )


def _refs(spec):
    """(kind, name, key) for every Secret/ConfigMap key a pod spec needs."""
    for c in spec.get("initContainers", []) + spec["containers"]:
        for var in c.get("env", []):
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref:
                yield "Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            if "configMapKeyRef" in ref:
                yield "ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
        for src in c.get("envFrom", []):
            if "configMapRef" in src:
                yield "ConfigMap", src["configMapRef"]["name"], None
            if "secretRef" in src:
                yield "Secret", src["secretRef"]["name"], None
    for vol in spec.get("volumes", []):
        for kind, field, name_key in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
            if field in vol:
                items = vol[field].get("items") or [{"key": None}]
                for item in items:
                    yield kind, vol[field][name_key], item["key"]


@pytest.mark.parametrize("variant", ALL)
def test_referenced_config_and_secret_keys_exist(rendered, variant):
    """Every ConfigMap/Secret key a pod needs exists; Secrets not rendered (prod) are
    the documented ones that come from outside the repo."""
    docs = rendered[variant]
    external = {
        "rabbitmq-credentials",
        "redis-credentials",
        "main-app-credentials",
        "service-app-credentials",
        "main-app-api-tokens",
        "rabbitmq-definitions",
    }
    docs_text = (Path(__file__).resolve().parents[2] / "docs/kubernetes.md").read_text()
    problems = []
    for obj in docs:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        for kind, name, key in _refs(pod_spec(obj)):
            target = next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)
            if target is None:
                if kind == "Secret" and name in external and f"`{name}`" in docs_text:
                    continue
                problems.append(f"{obj['metadata']['name']}: {kind} {name} not rendered")
            elif key is not None and key not in {**target.get("data", {}), **target.get("stringData", {})}:
                problems.append(f"{obj['metadata']['name']}: {kind} {name} has no key {key}")
    assert not problems, "\n".join(problems)
    ingress_tls = [t["secretName"] for o in docs if o["kind"] == "Ingress" for t in o["spec"].get("tls", [])]
    for name in ingress_tls:
        assert f"`{name}`" in docs_text, f"TLS Secret {name} is not documented"


@pytest.mark.parametrize("variant", ALL)
def test_scaler_queries_select_the_deployed_namespace(rendered, variant):
    docs = rendered[variant]
    namespaces = {o["metadata"]["namespace"] for o in docs if o["kind"] == "Deployment"}
    queries = [t["metadata"]["query"] for o in docs if o["kind"] == "ScaledObject" for t in o["spec"]["triggers"]]
    for query in queries:
        assert set(re.findall(r'namespace="([^"]+)"', query)) == namespaces, query


@pytest.mark.parametrize("variant", ALL)
def test_rabbitmq_loads_definitions_from_the_mounted_secret(rendered, variant):
    docs = rendered[variant]
    spec = pod_spec(find(docs, "StatefulSet", "rabbitmq"))
    (container,) = spec["containers"]
    cm_name = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")
    conf = find(docs, "ConfigMap", cm_name)["data"]["10-base.conf"]
    path = re.search(r"^load_definitions = (\S+)$", conf, re.M).group(1)
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"].startswith("rabbitmq-definitions")
    assert [i["path"] for i in volume["secret"]["items"]] == [path[len(mount["mountPath"]) + 1 :]]
    # No credentials in the broker's environment: users come from the definitions.
    assert not [e for e in container["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]]


@pytest.mark.parametrize("variant", ALL)
def test_everything_lands_in_the_jobs_namespace(rendered, variant):
    cluster_scoped = {"Namespace"}
    stray = [
        f"{o['kind']}/{o['metadata']['name']}: {o['metadata'].get('namespace')}"
        for o in rendered[variant]
        if o["kind"] not in cluster_scoped and o["metadata"].get("namespace") != "jobs"
    ]
    assert not stray, stray


# ---------------------------------------------------------------- third-party images

APP_IMAGES = {"main-app", "service-app"}
PINNED = re.compile(r"^(?P<name>[a-z0-9./-]+):(?P<tag>[\w.-]+)@sha256:[0-9a-f]{64}$")


def _containers(obj):
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


@pytest.mark.parametrize("variant", ALL)
def test_third_party_images_pinned_by_tag_and_digest(rendered, variant):
    problems = []
    for obj in rendered[variant]:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        for c in _containers(obj):
            image = c["image"]
            if image in APP_IMAGES:
                continue  # tagged at deploy time by Skaffold/Tilt
            if not PINNED.match(image):
                problems.append(f"{obj['metadata']['name']}/{c['name']}: {image} is not pinned by tag and digest")
    assert not problems, "\n".join(problems)


def _version(tag: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"^(\d+(?:\.\d+)*)", tag).group(1).split("."))


def test_redis_has_the_cve_2025_49844_fix(rendered):
    for variant in ALL:
        for obj in rendered[variant]:
            if obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == "redis":
                (c,) = _containers(obj)
                tag = PINNED.match(c["image"]).group("tag")
                # 7.4.6 fixed CVE-2025-49844 ("RediShell") on the 7.4 line.
                assert _version(tag) >= (7, 4, 6), c["image"]


def test_third_party_image_versions_live_in_one_place():
    """Only k8s/base/kustomization.yaml's `images:` names their tags; the manifests use
    bare names and the docs point there (k8s/sandbox/ swaps in its stand-ins by name)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\b(rabbitmq|redis):v?\d+\.\d+")
    where = sorted(
        f
        for f in tracked
        if not f.startswith("k8s/sandbox/")
        and f != "tests/k8s/test_manifests.py"
        and (ROOT / f).is_file()
        and (ROOT / f).suffix in {".yaml", ".yml", ".md", ".py", ".mk", ""}
        and pattern.search((ROOT / f).read_text(errors="replace"))
    )
    assert where == ["k8s/base/kustomization.yaml"], where
    base = yaml.safe_load((ROOT / "k8s/base/kustomization.yaml").read_text())
    assert {i["name"] for i in base["images"]} == {"rabbitmq", "redis"}


# ---------------------------------------------------------------- StatefulSets


@pytest.mark.parametrize("variant", ALL)
def test_statefulsets_change_volume_ownership_only_on_mismatch(rendered, variant):
    for obj in rendered[variant]:
        if obj["kind"] != "StatefulSet":
            continue
        ctx = pod_spec(obj)["securityContext"]
        assert "fsGroup" in ctx
        assert ctx.get("fsGroupChangePolicy") == "OnRootMismatch", obj["metadata"]["name"]


QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9, "": 1}
# redis.conf units: "1mb" = 1024*1024 bytes, "1m" = 1000000 bytes.
REDIS_UNITS = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "k": 10**3, "m": 10**6, "g": 10**9, "": 1}


def _bytes(value: str, units: dict[str, int]) -> int:
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(value)).groups()
    return int(number) * units[unit if unit in units else unit.lower()]


@pytest.mark.parametrize("variant", ALL)
def test_redis_memory_limit_leaves_room_for_an_aof_rewrite(rendered, variant):
    """An AOF rewrite forks; under writes the child's copy-on-write pages can approach
    the dataset's size, so the container needs about twice --maxmemory (else the
    kernel OOM-kills Redis in the middle of a rewrite)."""
    sts = [o for o in rendered[variant] if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "redis"]
    if not sts:
        pytest.skip(f"{variant}: no in-cluster Redis")
    (c,) = _containers(sts[0])
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    maxmemory = _bytes(args[args.index("--maxmemory") + 1], REDIS_UNITS)
    limit = _bytes(c["resources"]["limits"]["memory"], QUANTITY)
    assert limit >= 2 * maxmemory, f"{variant}: limit {limit >> 20} MiB < 2 x maxmemory {maxmemory >> 20} MiB"


@pytest.mark.parametrize("variant", ALL)
def test_rabbitmq_node_name_does_not_assume_a_cluster_domain(rendered, variant):
    """The node name is built from the downward API and the headless Service and is
    resolved through the pod's DNS search path: no cluster domain is written anywhere."""
    text = yaml.safe_dump_all(rendered[variant])
    assert "cluster.local" not in text
    sts = find(rendered[variant], "StatefulSet", "rabbitmq")
    (c,) = pod_spec(sts)["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["RABBITMQ_NODENAME"]["value"] == f"rabbit@$(POD_NAME).{sts['spec']['serviceName']}.$(POD_NAMESPACE)"
    assert env["RABBITMQ_USE_LONGNAME"]["value"] == "true"
    names = [e["name"] for e in c["env"]]
    assert names.index("POD_NAME") < names.index("RABBITMQ_NODENAME") > names.index("POD_NAMESPACE")


def test_prod_overlay_header_names_every_secret_it_needs(rendered):
    """The prod kustomization's header is what an operator reads first: it must list
    every Secret prod references but does not render."""
    docs = rendered["prod"]
    rendered_secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    needed = {
        name
        for obj in docs
        if obj["kind"] in WORKLOAD_KINDS
        for kind, name, _ in _refs(pod_spec(obj))
        if kind == "Secret"
    }
    needed |= {t["secretName"] for o in docs if o["kind"] == "Ingress" for t in o["spec"].get("tls", [])}
    lines = (ROOT / "k8s/overlays/prod/kustomization.yaml").read_text().splitlines(True)
    header = "".join(line for line in lines if line.startswith("#"))
    named = lambda name: re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", header)  # noqa: E731
    missing = {name for name in needed - rendered_secrets if not named(name)}
    assert not missing, f"k8s/overlays/prod/kustomization.yaml does not name {sorted(missing)}"


def test_sandbox_prod_lists_exactly_the_statefulsets_rabbitmq_nodes():
    """k8s/sandbox/overlays/prod (prod's topology on one node, RabbitMQ 4.0 stand-in): its
    classic_config peer list must name the nodes the StatefulSet runs, as RABBITMQ_NODENAME
    spells them, or the nodes would not find each other; its Secrets are generated."""
    ensure_secrets()
    docs = render_dir(ROOT / "k8s" / "sandbox" / "overlays" / "prod")
    sts = find(docs, "StatefulSet", "rabbitmq")
    pod = pod_spec(sts)
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    namespace = sts["metadata"]["namespace"]
    expected = {
        env["RABBITMQ_NODENAME"].replace("$(POD_NAME)", f"rabbitmq-{i}").replace("$(POD_NAMESPACE)", namespace)
        for i in range(sts["spec"]["replicas"])
    }
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("rabbitmq-config"))
    listed = {line.split("=", 1)[1].strip() for line in config["data"]["20-cluster.conf"].splitlines()
              if line.startswith("cluster_formation.classic_config.nodes.")}
    assert sts["spec"]["replicas"] == 3 and listed == expected
    assert sts["spec"]["serviceName"] == "rabbitmq-headless" and ".rabbitmq-headless." in next(iter(expected))
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["affinity"]["podAntiAffinity"]
    secrets = {re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"]) for d in docs if d["kind"] == "Secret"}
    assert {"rabbitmq-credentials", "rabbitmq-definitions", "redis-credentials", "main-app-credentials",
            "service-app-credentials", "main-app-api-tokens"} <= secrets
