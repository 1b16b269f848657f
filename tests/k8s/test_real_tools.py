"""The real Skaffold and Tilt read skaffold.yaml, the Tiltfile and the Makefile's
cluster targets, without a cluster (seconds, not a deploy).

Skaffold (`skaffold diagnose --yaml-only`, `skaffold render --offline=true
--digest-source=tag`): every profile loads and renders; the profiles compose as
intended, in the order Skaffold applies them (auto-activated ones first, in declaration
order, then those named with -p); prod inherits no hooks, port-forwards or verify;
`make deploy` passes only flags the subcommands have; `make undeploy` spares the
namespace; the smoke-test Job Skaffold builds from skaffold.yaml + the Job manifest
runs the smoke script with a writable /tmp.

Tilt (`tilt alpha tiltfile-result`): the Tiltfile loads (Tilt's own grouping of
objects into resources included, which a mock cannot reproduce) on a kind context,
with --without-operators and on the sandbox context; then its resources are
cross-checked.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import KIND_CONTEXT, ROOT, SANDBOX_CONTEXT, find, rel, render_dir, skaffold_verify_job

PROFILES = (None, "ci", "dev", "prod")  # None: no -p
SANDBOX_OVERLAYS = ROOT / "k8s" / "sandbox" / "overlays"
APPS = ("main-app", "service-app")


def run(cmd, env, timeout=120, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


# ---------------------------------------------------------------- skaffold diagnose


def overlay_of(config) -> str:
    (path,) = config["manifests"]["kustomize"]["paths"]
    return rel(path)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads_with_the_real_skaffold(diagnose, profile):
    config, applied = diagnose(profile)
    assert applied == ([profile] if profile else [])
    assert {a["image"] for a in config["build"]["artifacts"]} == set(APPS)


EXPECTED_OVERLAY = {
    None: "k8s/overlays/ci",
    "ci": "k8s/overlays/ci",
    "dev": "k8s/overlays/dev",
    "prod": "k8s/overlays/prod",
}


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_pick_overlay_targets_and_push(diagnose, profile):
    config, _ = diagnose(profile)
    assert overlay_of(config) == EXPECTED_OVERLAY[profile]
    target = "dev" if profile == "dev" else "production"
    for art in config["build"]["artifacts"]:
        assert art["docker"]["target"] == target, art
        assert ("sync" in art) == (profile == "dev"), art
        assert "buildArgs" not in art["docker"], "BASE_IMAGE is only overridden on the sandbox"
    local = config["build"]["local"]
    # Skaffold decides by kube context: load into kind/k3d/minikube, push elsewhere
    # (the sandbox pushes to its registry). Only prod forces a push.
    if profile == "prod":
        assert local.get("push") is True
    else:
        assert "push" not in local, f"build.local.push={local.get('push')} overrides Skaffold's per-context choice"


@pytest.mark.parametrize("profile", PROFILES)
def test_hooks_port_forwards_and_verify_only_where_wanted(diagnose, profile):
    config, _ = diagnose(profile)
    wanted = profile != "prod"
    hooks = config["manifests"].get("hooks", {}).get("before", [])
    assert bool(hooks) == wanted, hooks
    assert bool(config.get("portForward")) == wanted
    assert bool(config.get("verify")) == wanted
    for hook in hooks:
        cmd = hook["host"]["command"]
        # The credentials of the overlay (also under the sandbox's, which reuses them).
        assert cmd[:2] == ["python3", "k8s/scripts/gen-secrets.py"] and (ROOT / cmd[1]).exists()
        assert cmd[2] == EXPECTED_OVERLAY[profile]


def test_ci_environment_activates_profile_ci(diagnose):
    config, applied = diagnose(None, ci_env=True)
    assert applied == ["ci"] and overlay_of(config) == "k8s/overlays/ci"


@pytest.mark.parametrize("profile", PROFILES)
def test_sandbox_profile_composes_with_every_profile(diagnose, profile):
    """On context jobs-sandbox, `sandbox` is auto-activated and applied FIRST, then the
    named profile; the result still has the sandbox's overlay and base image and the
    named profile's targets."""
    config, applied = diagnose(profile, context=SANDBOX_CONTEXT)
    assert applied == ["sandbox"] + ([profile] if profile else [])
    base, kind_config = config, diagnose(profile)[0]
    for art, plain in zip(base["build"]["artifacts"], kind_config["build"]["artifacts"], strict=True):
        assert art["docker"]["buildArgs"] == {"BASE_IMAGE": "jobs-local/python-base:bookworm"}
        assert art["docker"]["target"] == plain["docker"]["target"]
        assert art.get("sync") == plain.get("sync")
    expected = {
        None: "k8s/sandbox/overlays/ci",
        "ci": "k8s/sandbox/overlays/ci",
        "dev": "k8s/sandbox/overlays/dev",
        "prod": "k8s/sandbox/overlays/prod",
    }[profile]
    assert overlay_of(config) == expected
    assert "push" not in config["build"]["local"] or profile == "prod"
    assert config.get("verify") == kind_config.get("verify")


def test_sandbox_profile_is_not_active_elsewhere(diagnose):
    for profile in PROFILES:
        assert "sandbox" not in diagnose(profile)[1]


def test_sandbox_base_image_is_the_dockerfiles_build_arg():
    for app in APPS:
        assert re.search(r"^ARG BASE_IMAGE=", (ROOT / app / "Dockerfile").read_text(), re.M), app


# ---------------------------------------------------------------- skaffold render


@pytest.fixture(scope="session")
def skaffold_render(skaffold_bin, tool_env, tmp_path_factory, rendered):
    out_dir = tmp_path_factory.mktemp("skaffold-render")

    def do(profile=None, context=KIND_CONTEXT, skaffold_global=None, extra=()):
        env = tool_env(context, skaffold_global)
        out = out_dir / f"{profile}-{context}-{len(list(out_dir.iterdir()))}.yaml"
        cmd = [skaffold_bin, "render", "--offline=true", "--digest-source=tag", "-o", str(out)]
        cmd += ["-p", profile] if profile else []
        cmd += list(extra)
        proc = run(cmd, env, timeout=180)
        assert proc.returncode == 0 and out.exists(), (
            f"{shlex.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
        return [d for d in yaml.safe_load_all(out.read_text()) if d]

    return do


def images(docs):
    return {
        c["name"]: c["image"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    }


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_renders_with_the_real_skaffold(skaffold_render, diagnose, profile):
    docs = skaffold_render(profile)
    overlay = render_dir(ROOT / overlay_of(diagnose(profile)[0]))
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, docs)) == sorted(map(key, overlay))
    imgs = images(docs)
    for app in APPS:
        assert re.fullmatch(rf"{app}:[0-9a-f]{{7,}}(-dirty)?", imgs[app]), imgs[app]
    for name, image in imgs.items():
        if name not in APPS:
            assert image == images(overlay)[name], "third-party images are rendered as pinned"


def test_sandbox_renders_into_its_registry(skaffold_render):
    if not (SANDBOX_OVERLAYS / "ci").is_dir():
        pytest.skip(f"{SANDBOX_OVERLAYS.relative_to(ROOT)}/ci does not exist yet (k8s/sandbox/ provides it)")
    # What the sandbox's Skaffold global config holds for its context.
    config = {"global": {}, "kubeContexts": [{"kube-context": SANDBOX_CONTEXT, "default-repo": "localhost:5000"}]}
    docs = skaffold_render("ci", context=SANDBOX_CONTEXT, skaffold_global=config)
    for app in APPS:
        assert images(docs)[app].startswith(f"localhost:5000/{app}:"), images(docs)[app]


# ---------------------------------------------------------------- make deploy / undeploy


def make_dry_run(target, **variables):
    args = ["make", "-n", target] + [f"{k}={v}" for k, v in variables.items()]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r"\\\n\s*", " ", proc.stdout)  # one line per command
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def skaffold_flags(skaffold_bin, tool_env):
    cache = {}

    def flags(subcommand):
        if subcommand not in cache:
            proc = run([skaffold_bin, subcommand, "--help"], tool_env())
            assert proc.returncode == 0, proc.stderr
            cache[subcommand] = set(re.findall(r"(?:^|\s|,)(--[a-z][a-z0-9-]*)", proc.stdout))
        return cache[subcommand]

    return flags


@pytest.mark.parametrize("profile", ("ci", "dev", "prod"))
def test_make_deploy_passes_only_real_flags(skaffold_flags, diagnose, profile):
    lines = make_dry_run("deploy", PROFILE=profile, IMAGE_REPO="registry.example.com/jobs")
    calls = [shlex.split(line) for line in lines if line.startswith("skaffold ")]
    assert calls, lines
    for argv in calls:
        sub = argv[1]
        for arg in argv[2:]:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                assert flag in skaffold_flags(sub), f"`skaffold {sub}` has no {flag} (make deploy PROFILE={profile})"
    subs = [a[1] for a in calls]
    assert subs[:2] == ["build", "deploy"], subs
    build, deploy = calls[0], calls[1]
    artifacts = build[build.index("--file-output") + 1]
    assert deploy[deploy.index("--build-artifacts") + 1] == artifacts
    # Built by another process: kind gets the images only when told to load them.
    assert "--load-images=true" in deploy
    has_verify = bool(diagnose(profile)[0].get("verify"))
    assert ("verify" in subs) == has_verify
    if has_verify:
        verify = calls[subs.index("verify")]
        assert verify[verify.index("--build-artifacts") + 1] == artifacts
    for argv in calls:
        assert argv[argv.index("-p") + 1] == profile
        assert argv[argv.index("--default-repo") + 1] == "registry.example.com/jobs"


@pytest.mark.parametrize("profile", ("ci", "prod"))
def test_make_deploy_of_a_release_deploys_the_pushed_images_without_building(skaffold_flags, skaffold_render,
                                                                             diagnose, profile):
    lines = make_dry_run("deploy", PROFILE=profile, IMAGE_REPO="docker.io/alice", RELEASE="1.2.3")
    calls = [shlex.split(line) for line in lines if line.startswith("skaffold ")]
    subs = [argv[1] for argv in calls]
    assert subs[:1] == ["deploy"] and "build" not in subs, subs
    assert ("verify" in subs) == bool(diagnose(profile)[0].get("verify"))
    for argv in calls:
        for arg in argv[2:]:
            if arg.startswith("--"):
                assert arg.split("=", 1)[0] in skaffold_flags(argv[1]), f"`skaffold {argv[1]}` has no {arg}"
        assert argv[argv.index("--build-artifacts") + 1] == "reports/k8s/release.json"
    # The file names exactly the pushed images, and Skaffold puts them into what it deploys.
    proc = subprocess.run(["make", "release-artifacts", "IMAGE_REPO=docker.io/alice", "RELEASE=1.2.3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    artifacts = ROOT / "reports" / "k8s" / "release.json"
    assert json.loads(artifacts.read_text()) == {
        "builds": [{"imageName": app, "tag": f"docker.io/alice/{app}:1.2.3"} for app in APPS]}
    docs = skaffold_render(profile, extra=["--build-artifacts", str(artifacts)])
    assert {app: images(docs)[app] for app in APPS} == {app: f"docker.io/alice/{app}:1.2.3" for app in APPS}


def test_make_deploy_of_a_release_needs_the_registry():
    proc = subprocess.run(["make", "deploy", "PROFILE=prod", "RELEASE=1.2.3", "IMAGE_REPO="], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs IMAGE_REPO" in proc.stderr, proc.stderr


def test_make_undeploy_does_not_use_skaffold_delete():
    lines = make_dry_run("undeploy", PROFILE="ci")
    assert not [line for line in lines if line.startswith("skaffold delete")]
    assert any("k8s/scripts/undeploy.py --profile ci" in line for line in lines), lines


@pytest.mark.parametrize("profile", ("ci", "dev", "prod"))
def test_undeploy_keeps_the_namespace(skaffold_bin, tool_env, rendered, profile):
    proc = run(
        ["python3", "k8s/scripts/undeploy.py", "--profile", profile, "--skaffold", skaffold_bin, "--dry-run"],
        tool_env(),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    deleted = set(proc.stdout.split())
    assert not {o for o in deleted if o.split("/")[0] in ("Namespace", "PersistentVolumeClaim")}, deleted
    assert "Namespace/jobs" in proc.stderr  # reported as kept
    expected = {f"{d['kind']}/{d['metadata']['name']}" for d in rendered[profile] if d["kind"] != "Namespace"}
    assert deleted == expected


def test_undeploy_help_text_is_true():
    text = (ROOT / "mk" / "k8s.mk").read_text()
    (help_line,) = [line for line in text.splitlines() if line.startswith("undeploy:")]
    assert "keeps namespace jobs" in help_line and "PVCs" in help_line


# ---------------------------------------------------------------- skaffold verify


@pytest.mark.parametrize("profile", ("ci", "dev"))
def test_verify_job_runs_the_smoke_script_with_a_writable_tmp(diagnose, profile):
    import kubernetes_validate

    config, _ = diagnose(profile)
    (case,) = config["verify"]
    job = skaffold_verify_job(case)
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container.get("command", [])[:2] == ["python3", "-c"], "the image's default command (gunicorn) would run"
    assert "POST /jobs -> 202" in container["command"][2]
    assert case["container"]["image"] in {a["image"] for a in config["build"]["artifacts"]}
    if container["securityContext"].get("readOnlyRootFilesystem"):
        tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert tmp, "read-only root filesystem without a writable /tmp"
        (volume,) = [v for v in spec["volumes"] if v["name"] == tmp[0]["name"]]
        assert "emptyDir" in volume
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(job, version, strict=True)


def test_verify_job_mounts_the_token_secret_and_may_call_the_api(diagnose, rendered):
    (case,) = diagnose("ci")[0]["verify"]
    job = skaffold_verify_job(case)
    docs = rendered["ci"]
    spec = job["spec"]["template"]["spec"]
    tokens = find(docs, "Secret", "main-app-api-tokens")  # fixed name mounted by the Job
    assert tokens["metadata"]["name"] in {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    labels = job["spec"]["template"]["metadata"]["labels"]
    pol = find(docs, "NetworkPolicy", "api-clients-egress")
    assert all(labels.get(k) == v for k, v in pol["spec"]["podSelector"]["matchLabels"].items())


# ---------------------------------------------------------------- tilt alpha tiltfile-result


@pytest.fixture(scope="session")
def tiltfile_result(tilt_bin, tool_env, rendered):
    """tiltfile_result(context, args, tiltfile) -> (exit code, result JSON or None, stderr)."""
    cache = {}

    def get(context=KIND_CONTEXT, args=(), tiltfile="Tiltfile"):
        key = (context, tuple(args), tiltfile)
        if key not in cache:
            cmd = [tilt_bin, "alpha", "tiltfile-result", "-f", str(tiltfile)] + (["--", *args] if args else [])
            proc = run(cmd, tool_env(context), timeout=180)
            result = json.loads(proc.stdout) if proc.returncode == 0 else None
            cache[key] = (proc.returncode, result, proc.stderr)
        return cache[key]

    return get


def loaded(tiltfile_result, **kw) -> dict:
    code, result, stderr = tiltfile_result(**kw)
    assert code == 0, f"the real Tilt refuses the Tiltfile ({kw}), exit {code}:\n{stderr[-4000:]}"
    return {m["Name"]: m for m in result["Manifests"]}


def deployed(manifest) -> list[dict]:
    return [d for d in yaml.safe_load_all(manifest["DeployTarget"].get("yaml") or "") if d]


def test_tiltfile_loads_in_the_real_tilt(tiltfile_result):
    manifests = loaded(tiltfile_result)
    assert {"namespace", "config", "rabbitmq", "redis", "main-app", "service-app", "unit-tests", "locust"} == set(
        manifests
    ), "Tilt's 'uncategorized' resource means objects no k8s_resource claims"


@pytest.mark.parametrize("args", [(), ("--without-operators",)])
def test_every_dev_object_is_deployed_exactly_once(tiltfile_result, rendered, args):
    manifests = loaded(tiltfile_result, args=args)
    objects = [(d["kind"], d["metadata"]["name"]) for m in manifests.values() for d in deployed(m)]
    assert len(objects) == len(set(objects)), "an object in two resources"
    operators = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    expected = {(d["kind"], d["metadata"]["name"]) for d in rendered["dev"] if not (args and d["kind"] in operators)}
    assert set(objects) == expected


def test_tilt_groups_services_with_their_workloads(tiltfile_result):
    manifests = loaded(tiltfile_result)
    for name in ("main-app", "service-app", "rabbitmq", "redis"):
        kinds = {d["kind"] for d in deployed(manifests[name])}
        assert kinds & {"Deployment", "StatefulSet"}, name
    assert {d["kind"] for d in deployed(manifests["config"])}.isdisjoint({"Service", "Deployment", "StatefulSet"})
    assert [d["kind"] for d in deployed(manifests["namespace"])] == ["Namespace"]


def test_apps_wait_for_the_broker_and_the_store(tiltfile_result):
    manifests = loaded(tiltfile_result)
    for app in ("main-app", "service-app"):
        assert {"rabbitmq", "redis"} <= set(manifests[app]["ResourceDependencies"])
        (image,) = manifests[app]["ImageTargets"]
        assert image["BuildDetails"]["target"] == "dev"
    for infra in ("rabbitmq", "redis"):
        assert manifests[infra]["ResourceDependencies"] == ["config"]
    assert manifests["config"]["ResourceDependencies"] == ["namespace"]


# Tilt's model.TriggerMode: 0 auto, 1 manual with auto-init, 2 manual, 3 auto without auto-init.
TRIGGER_AUTO_NO_INIT, TRIGGER_MANUAL = 3, 2


def test_unit_tests_never_run_on_start_and_need_no_root(tiltfile_result):
    manifests = loaded(tiltfile_result)
    unit = manifests["unit-tests"]
    assert unit["TriggerMode"] == TRIGGER_AUTO_NO_INIT
    argv = unit["DeployTarget"]["UpdateCmdSpec"]["args"]
    script = argv[-1]
    # `make test` depends on services-deps (apt-get install, root); the unit tests do not.
    assert not re.search(r"\bmake\s+(\S+\s+)*test\b(?!-)", script), script
    assert "tests/unit" in script
    for dep in unit["DeployTarget"]["Deps"]:
        assert Path(dep).exists(), dep


def test_locust_passes_the_token_the_locustfile_reads(tiltfile_result):
    manifests = loaded(tiltfile_result)
    locust = manifests["locust"]
    assert locust["TriggerMode"] == TRIGGER_MANUAL and set(locust["ResourceDependencies"]) == {
        "main-app",
        "service-app",
    }
    script = locust["DeployTarget"]["UpdateCmdSpec"]["args"][-1]
    argv = shlex.split(script)
    assert argv[:2] == ["make", "loadtest"], argv
    variables = dict(a.split("=", 1) for a in argv[2:] if "=" in a)
    token_file = next(v for v in variables.values() if v.endswith("/secrets/api-tokens"))
    # What make really runs with these arguments: locust gets the file in the variable
    # the locustfile reads.
    lines = make_dry_run("loadtest", **variables)
    (locust_line,) = [line for line in lines if "locust -f loadtest/locustfile.py" in line]
    reads = set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', (ROOT / "loadtest/locustfile.py").read_text()))
    passed = dict(re.findall(r'([A-Z_]+)="?([^"\s]+)"?', locust_line))
    assert any(passed.get(name) == token_file for name in reads), (locust_line, reads)
    assert "--host" in locust_line and variables.get("HOST", "") in locust_line


def test_sandbox_context_loads_its_overlay_and_local_base(tiltfile_result):
    if not (SANDBOX_OVERLAYS / "dev").is_dir():
        pytest.skip(f"{SANDBOX_OVERLAYS.relative_to(ROOT)}/dev does not exist yet (k8s/sandbox/ provides it)")
    manifests = loaded(tiltfile_result, context=SANDBOX_CONTEXT)
    for app in ("main-app", "service-app"):
        (image,) = manifests[app]["ImageTargets"]
        assert "BASE_IMAGE=jobs-local/python-base:bookworm" in image["BuildDetails"].get("args", []), image[
            "BuildDetails"
        ]
    plain = loaded(tiltfile_result)
    assert (
        "args" not in plain["main-app"]["ImageTargets"][0]["BuildDetails"]
        or not plain["main-app"]["ImageTargets"][0]["BuildDetails"]["args"]
    )


def test_an_unknown_context_is_refused(tiltfile_result):
    """Negative control: the real Tilt refuses contexts the Tiltfile does not allow, so
    a load on jobs-sandbox succeeding means allow_k8s_contexts covers it."""
    code, _, stderr = tiltfile_result(context="some-prod-cluster")
    assert code != 0 and "allow_k8s_contexts" in stderr


def test_sandbox_context_is_allowed(tiltfile_result):
    code, _, stderr = tiltfile_result(context=SANDBOX_CONTEXT)
    assert "allow_k8s_contexts" not in stderr, stderr[-2000:]
    if not (SANDBOX_OVERLAYS / "dev").is_dir():
        assert "k8s/sandbox/overlays/dev" in stderr  # fails later, at the missing overlay
    else:
        assert code == 0, stderr[-3000:]


def test_naming_an_attached_service_in_objects_fails_to_load(tilt_bin, tool_env, tmp_path):
    """Negative control for the rule the Tiltfile follows: the real Tilt groups a Service
    with the workload its selector matches, then refuses it in k8s_resource(objects=)."""
    (tmp_path / "app.yaml").write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": "web", "namespace": "jobs"},
                    "spec": {
                        "selector": {"matchLabels": {"app": "web"}},
                        "template": {
                            "metadata": {"labels": {"app": "web"}},
                            "spec": {"containers": [{"name": "web", "image": "nginx"}]},
                        },
                    },
                },
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "web", "namespace": "jobs"},
                    "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
                },
            ]
        )
    )
    tiltfile = tmp_path / "Tiltfile"
    tiltfile.write_text(
        "allow_k8s_contexts('kind-jobs')\nk8s_yaml('app.yaml')\n"
        "k8s_resource(new_name='config', objects=['web:service:jobs'])\n"
    )
    proc = subprocess.run(
        [tilt_bin, "alpha", "tiltfile-result", "-f", str(tiltfile)],
        cwd=tmp_path,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "could be found in remaining YAML" in proc.stderr, proc.stderr[-2000:]
