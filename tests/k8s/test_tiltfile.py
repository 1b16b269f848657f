"""Fast structural checks: evaluate the Tiltfile with starlark-pyo3, recording every
Tilt builtin call, then cross-check what it declares against the repo and the rendered
dev overlay. A mock cannot see Tilt's own rules (how it groups objects into resources,
argument checks): that the Tiltfile LOADS is proven by the real Tilt in
test_real_tools.py."""

from __future__ import annotations

import re
import subprocess

import pytest
import starlark as sl
import yaml

from conftest import ROOT, kubectl

TILT_BUILTINS = [
    "docker_build",
    "k8s_yaml",
    "k8s_resource",
    "local_resource",
    "local",
    "kustomize",
    "decode_yaml_stream",
    "encode_yaml_stream",
    "update_settings",
    "default_registry",
    "allow_k8s_contexts",
    "sync",
    "run",
    "fall_back_on",
    "port_forward",
    "link",
    "watch_file",
    "k8s_context",
]


class Recorder:
    def __init__(self, subcommand: str, env: dict[str, str], args: dict | None = None, context: str = "kind-jobs"):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.subcommand = subcommand
        self.env = env
        self.args = args or {}
        self.context = context
        self.defined: dict[str, str] = {}

    def builtin(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return getattr(self, "do_" + name, lambda *a, **k: {"_tilt": name, "args": list(a), **k})(*args, **kwargs)

        return call

    def do_kustomize(self, path, **_):
        if not (ROOT / path).is_dir() and path.startswith("k8s/sandbox/"):
            path = "k8s/overlays/dev"  # the sandbox's overlay may not exist yet: its base
        proc = subprocess.run([kubectl(), "kustomize", str(ROOT / path)], capture_output=True, text=True, check=True)
        return proc.stdout

    def do_k8s_context(self):
        return self.context

    def do_decode_yaml_stream(self, text):
        return [d for d in yaml.safe_load_all(text) if d]

    def do_encode_yaml_stream(self, objects):
        return yaml.safe_dump_all(list(objects))

    def do_local(self, command, **_):
        return ""

    def define_bool(self, name, args=False, usage=""):
        self.defined[name] = "bool"

    def config_parse(self):
        unknown = set(self.args) - set(self.defined)
        assert not unknown, f"Tiltfile does not define {unknown}"
        return dict(self.args)

    def getenv(self, name, default=None):
        return self.env.get(name, default)

    def of(self, name):
        return [c for c in self.calls if c[0] == name]


def evaluate(subcommand="up", env=None, args=None, context="kind-jobs") -> Recorder:
    rec = Recorder(subcommand, env or {}, args, context)
    module = sl.Module()
    for name in TILT_BUILTINS:
        module.add_callable(name, rec.builtin(name))
    module.add_callable("_getenv", rec.getenv)
    module.add_callable("_define_bool", rec.define_bool)
    module.add_callable("_config_parse", rec.config_parse)
    dialect = sl.Dialect.extended()
    dialect.enable_top_level_stmt = True
    globals_ = sl.Globals.extended_by(
        [sl.LibraryExtension.Print, sl.LibraryExtension.StructType, sl.LibraryExtension.Json]
    )
    prelude = (
        f"config = struct(tilt_subcommand={subcommand!r}, define_bool=_define_bool, parse=_config_parse)\n"
        "os = struct(getenv=_getenv)\n"
        "TRIGGER_MODE_AUTO = 1\nTRIGGER_MODE_MANUAL = 2\n"
    )
    sl.eval(module, sl.parse("prelude", prelude, dialect), globals_)
    sl.eval(module, sl.parse("Tiltfile", (ROOT / "Tiltfile").read_text(), dialect), globals_)
    return rec


@pytest.fixture(scope="module")
def tilt(rendered) -> Recorder:
    return evaluate()


@pytest.fixture(scope="module")
def dev_docs(rendered):
    return rendered["dev"]


def workloads(docs):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def test_images_built_are_used_and_vice_versa(tilt, dev_docs):
    built = {c[1][0] for c in tilt.of("docker_build")}
    used = {c["image"] for w in workloads(dev_docs).values() for c in w["spec"]["template"]["spec"]["containers"]}
    ours = {i for i in used if ":" not in i}  # rabbitmq/redis come from public tags
    assert built == ours == {"main-app", "service-app"}


def test_docker_builds_target_dev_and_sync_real_paths(tilt):
    for _, args, kw in tilt.of("docker_build"):
        image, context = args
        dockerfile = ROOT / context / kw["dockerfile"]
        assert dockerfile.exists()
        assert re.search(rf"^FROM\s+\S+\s+AS\s+{kw['target']}\b", dockerfile.read_text(), re.M | re.I)
        dev_stage = dockerfile.read_text().split("AS dev", 1)[1]
        steps = kw["live_update"]
        assert steps[0]["_tilt"] == "fall_back_on", "fall_back_on must come first"
        for f in steps[0]["args"][0]:
            assert (ROOT / f).exists(), f"fall_back_on path {f} missing"
        syncs = [s for s in steps if s["_tilt"] == "sync"]
        assert syncs
        for s in syncs:
            src, dest = s["args"]
            assert (ROOT / src).is_dir(), f"live_update sync source {src} missing"
            # the dev stage copies exactly this directory to exactly this place
            assert re.search(rf"^COPY\s+(--\S+\s+)*{re.escape(src)}/?\s+{re.escape(dest)}/?\s*$", dev_stage, re.M), (
                f"{image}: dev stage does not COPY {src} to {dest}"
            )
        for path in kw.get("only", []):
            assert (ROOT / path).exists()


def test_k8s_yaml_is_the_dev_overlay(tilt):
    (call,) = tilt.of("kustomize")
    assert call[1][0] == "k8s/overlays/dev"
    assert tilt.of("k8s_yaml")
    assert any("gen-secrets.py k8s/overlays/dev" in c[1][0] for c in tilt.of("local"))


def test_k8s_resources_name_real_workloads_and_ports(tilt, dev_docs):
    wl = workloads(dev_docs)
    resources = {}
    for _, args, kw in tilt.of("k8s_resource"):
        name = kw.get("new_name") or (args[0] if args else kw.get("workload"))
        resources[name] = kw
        if args or kw.get("workload"):
            workload = args[0] if args else kw["workload"]
            assert workload in wl, f"k8s_resource {workload}: no such workload"
            ports = {
                p["containerPort"]
                for c in wl[workload]["spec"]["template"]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            for pf in kw.get("port_forwards", []):
                assert pf["_tilt"] == "port_forward"
                container_port = pf["args"][1] if len(pf["args"]) > 1 else pf["args"][0]
                assert container_port in ports, f"{workload}: port-forward to {container_port}, container ports {ports}"
        assert set(kw.get("labels", [])) <= {"app", "infra", "tests", "loadtest"}
    assert set(wl) <= set(resources), f"workloads without k8s_resource: {set(wl) - set(resources)}"
    # The apps start after the broker and the store.
    for app in ("main-app", "service-app"):
        assert {"rabbitmq", "redis"} <= set(resources[app]["resource_deps"])
    # Every non-workload object belongs to a resource (nothing uncategorized): a Service
    # whose selector matches a workload's pods is Tilt's (it groups it with that
    # workload) and must NOT be named in objects=; everything else is named.
    assigned = {o for kw in resources.values() for o in kw.get("objects", [])}
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in wl.values()]
    for d in dev_docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            continue
        sel = f"{d['metadata']['name']}:{d['kind'].lower()}" + (
            "" if d["kind"] == "Namespace" else f":{d['metadata']['namespace']}"
        )
        selector = d.get("spec", {}).get("selector") if d["kind"] == "Service" else None
        attached = bool(selector) and any(all(lab.get(k) == v for k, v in selector.items()) for lab in pod_labels)
        assert (sel in assigned) != attached, (sel, "attached by Tilt" if attached else "unassigned")
    names = set(resources) | {c[1][0] for c in tilt.of("local_resource")}
    for kw in resources.values():
        assert set(kw.get("resource_deps", [])) <= names


def test_local_resources(tilt):
    local = {c[1][0]: c[2] for c in tilt.of("local_resource")}
    tests = local["unit-tests"]
    # Never on start-up (`make test` needs root and apt; even the unit tests are opt-in).
    assert "tests" in tests["labels"] and tests["auto_init"] is False
    assert "make test" not in tests["cmd"].replace("make test-", "") and "tests/unit" in tests["cmd"]
    for dep in tests["deps"]:
        assert (ROOT / dep).exists(), dep
    locust = local["locust"]
    assert locust["labels"] == ["loadtest"] and locust["auto_init"] is False
    assert locust["trigger_mode"] == 2  # TRIGGER_MODE_MANUAL


def test_sandbox_context_uses_its_overlay_and_the_local_base(rendered):
    rec = evaluate(context="jobs-sandbox")
    (call,) = rec.of("kustomize")
    assert call[1][0] == "k8s/sandbox/overlays/dev"
    for _, _, kw in rec.of("docker_build"):
        assert kw["build_args"] == {"BASE_IMAGE": "jobs-local/python-base:bookworm"}
    assert "jobs-sandbox" in [c[1][0] for c in rec.of("allow_k8s_contexts")]
    # Credentials still come from the dev overlay (the sandbox overlay reuses them).
    assert any("gen-secrets.py k8s/overlays/dev" in c[1][0] for c in rec.of("local"))
    plain = evaluate()
    assert all(kw["build_args"] == {} for _, _, kw in plain.of("docker_build"))


def test_registry_and_context_from_env(rendered):
    rec = evaluate(env={"TILT_DEFAULT_REGISTRY": "docker.io/alice", "TILT_ALLOW_K8S_CONTEXT": "prod-like"})
    assert rec.of("default_registry")[0][1][0] == "docker.io/alice"
    assert "prod-like" in [c[1][0] for c in rec.of("allow_k8s_contexts")]
    assert not evaluate().of("default_registry")


def applied_kinds(rec: Recorder) -> set[str]:
    (call,) = rec.of("k8s_yaml")
    return {d["kind"] for d in yaml.safe_load_all(call[1][0]) if d}


def test_without_operators_option(rendered):
    operators = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert operators <= applied_kinds(evaluate())
    plain = evaluate(args={"without-operators": True})
    assert not operators & applied_kinds(plain)
    assert {"Deployment", "StatefulSet", "Secret", "NetworkPolicy"} <= applied_kinds(plain)
    objects = {o for c in plain.of("k8s_resource") for o in c[2].get("objects", [])}
    assert not [o for o in objects if o.split(":")[1] in {k.lower() for k in operators}]


def test_build_context_filter_keeps_what_the_dockerfile_copies(tilt):
    """`only=` narrows the build context; every COPY source must stay inside it."""
    for _, args, kw in tilt.of("docker_build"):
        text = (ROOT / args[1] / kw["dockerfile"]).read_text()
        sources = []
        for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
            parts = [p for p in line.split() if not p.startswith("--")]
            if "--from" in line:
                continue
            sources += parts[:-1]
        assert sources
        only = [o.rstrip("/") for o in kw["only"]]
        for src in sources:
            src = src.rstrip("/")
            assert any(src == o or src.startswith(o + "/") for o in only), f"{args[0]}: COPY {src} outside only={only}"
