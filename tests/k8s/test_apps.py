"""Manifests cross-checked against the REAL apps.

The apps are started from the project's .venv with exactly the environment the ci
overlay gives their containers (ConfigMaps and Secrets resolved), against private
RabbitMQ and Redis nodes from jobs_devtools.stack (scripts/stack.py, the local stack's helper). Only the
URLs of those nodes, the token file path and the listening ports (free ports, so a
running `make run` does not collide) are substituted; the test proves separately that
the manifests' port variables equal the container ports.

Checks: probe paths answer on the ports the probes name; every environment variable
the apps read is set or defaulted, every variable set is read; shared variables agree;
the metric names used by KEDA and the PrometheusRules are exposed by the running apps
and RabbitMQ; the smoke-test Job's script passes against the running system.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, find, pod_spec, skaffold_verify_job
from jobs_devtools.stack import App, RabbitNode, RedisNode, start_api, start_worker, wait_http

pytestmark = pytest.mark.apps

APP_CONFIG = {"main-app": "main_app.config", "service-app": "service_app.config"}
VENV_BIN = ROOT / ".venv" / "bin"


# ----------------------------------------------------------------- env vars the apps declare


@functools.cache
def declared_env(app: str) -> dict[str, object]:
    """{NAME: default} of every environment variable the app reads: the fields its settings
    classes declare (config.py and jobs_contract.settings), asked of the project's venv."""
    if not (VENV_BIN / "python").exists():
        pytest.fail("the project venv is missing: run `make venv` (make test-k8s does)")
    code = f"import json, {APP_CONFIG[app]} as config; print(json.dumps(config.environment()))"
    proc = subprocess.run([str(VENV_BIN / "python"), "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def env_reads(app: str) -> set[str]:
    """Every environment variable the app reads."""
    return set(declared_env(app))


def test_declared_env_finds_the_config():
    reads = env_reads("main-app")
    assert {"RABBITMQ_URL", "REDIS_URL", "HTTP_PORT", "METRICS_PORT", "JOB_MAX_SLEEP_SECONDS"} <= set(reads)
    assert {"RABBITMQ_URL", "WORKER_CONCURRENCY", "SHUTDOWN_GRACE_SECONDS"} <= env_reads("service-app")
    assert {"API_TOKENS", "API_TOKENS_FILE", "PROMETHEUS_MULTIPROC_DIR", "LOG_LEVEL"} <= reads


def secret_data(docs, name: str) -> dict[str, str]:
    obj = find(docs, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()} | obj.get("stringData", {})


def container_env(docs, app: str) -> dict[str, str]:
    """The container's environment as Kubernetes would build it (envFrom, then env)."""
    dep = find(docs, "Deployment", app)
    (container,) = pod_spec(dep)["containers"]
    env: dict[str, str] = {}

    def data_of(kind, name):
        return secret_data(docs, name) if kind == "Secret" else find(docs, kind, name)["data"]

    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(data_of("ConfigMap", src["configMapRef"]["name"]))
        else:
            env.update(data_of("Secret", src["secretRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
        else:
            ref = var["valueFrom"]
            if "secretKeyRef" in ref:
                env[var["name"]] = data_of("Secret", ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
            elif "configMapKeyRef" in ref:
                env[var["name"]] = data_of("ConfigMap", ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
    return env


@pytest.mark.parametrize("app", list(APP_CONFIG))
@pytest.mark.parametrize("overlay", ["dev", "ci", "prod"])
def test_every_env_var_set_is_read(rendered, overlay, app):
    docs = rendered[overlay]
    dep = find(docs, "Deployment", app)
    (container,) = pod_spec(dep)["containers"]
    names: set[str] = {v["name"] for v in container.get("env", [])}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            names |= set(find(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
    unused = sorted(names - env_reads(app))
    assert not unused, f"{overlay} sets {unused} on {app}, which never reads them (typo or dead config)"


def pod_environment(docs, app: str, files: Path) -> dict[str, str]:
    """The container's environment, with every mounted Secret's keys written under `files` and
    the variables that point into those mounts pointed there instead."""
    env = container_env(docs, app)
    spec = pod_spec(find(docs, "Deployment", app))
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if not secret:
            continue
        local = files / mount["name"]
        local.mkdir(parents=True)
        for key, value in secret_data(docs, secret["secretName"]).items():
            (local / key).write_text(value)
        env = {k: v.replace(mount["mountPath"], str(local), 1) if v.startswith(mount["mountPath"]) else v
               for k, v in env.items()}
    return env


@pytest.mark.parametrize("app", list(APP_CONFIG))
@pytest.mark.parametrize("overlay", ["dev", "ci"])  # prod's Secrets are created outside the manifests
def test_the_apps_accept_the_environment_each_overlay_gives_them(rendered, overlay, app, tmp_path):
    """The checks each app runs on its settings at start (main-app refuses to run without API
    tokens, service-app a prefetch below its concurrency, ...) pass with what the overlay sets,
    the mounted token file included."""
    env = pod_environment(rendered[overlay], app, tmp_path)
    classes = {"main-app": ("Settings", "ServerSettings"), "service-app": ("Settings",)}[app]
    code = f"import {APP_CONFIG[app]} as config; " + "; ".join(f"config.{c}.from_env()" for c in classes)
    proc = subprocess.run([str(VENV_BIN / "python"), "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ["PATH"], **env})
    assert proc.returncode == 0, f"{app} refuses {overlay}'s environment:\n{proc.stderr[-2000:]}"


@pytest.mark.parametrize("overlay", ["dev", "ci"])
def test_shared_settings_agree(rendered, overlay):
    docs = rendered[overlay]
    main, worker = container_env(docs, "main-app"), container_env(docs, "service-app")
    both = env_reads("main-app") & env_reads("service-app")
    # Each app connects as its own least-privilege RabbitMQ user, to the same broker.
    per_app = {"METRICS_HOST", "METRICS_PORT", "RABBITMQ_URL"}
    assert main["RABBITMQ_URL"].split("@")[1] == worker["RABBITMQ_URL"].split("@")[1]
    assert main["RABBITMQ_URL"].startswith("amqp://main-app:")
    assert worker["RABBITMQ_URL"].startswith("amqp://service-app:")
    for name in sorted(both - per_app):
        assert main.get(name) == worker.get(name), (
            f"{name}: main-app {main.get(name)!r} != service-app {worker.get(name)!r}"
        )


@pytest.mark.parametrize("overlay", ["dev", "ci", "prod"])
def test_port_variables_equal_container_ports(rendered, overlay):
    docs = rendered[overlay]
    expected = {
        "main-app": {"http": "HTTP_PORT", "metrics": "METRICS_PORT"},
        "service-app": {"metrics": "METRICS_PORT"},
    }
    for app, ports in expected.items():
        (container,) = pod_spec(find(docs, "Deployment", app))["containers"]
        env = {}
        for src in container.get("envFrom", []):
            if "configMapRef" in src:
                env.update(find(docs, "ConfigMap", src["configMapRef"]["name"])["data"])
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert set(named) == set(ports), (app, named)
        for port_name, var in ports.items():
            assert int(env[var]) == named[port_name], f"{app}: {var}={env[var]} but port {port_name}={named[port_name]}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in named


def test_app_defaults_equal_container_ports():
    """Unset, the apps listen where the containers declare (defaults from the code)."""
    reads = {
        (app, name): declared_env(app)[name]
        for app in APP_CONFIG
        for name in ("HTTP_PORT", "METRICS_PORT")
        if name in declared_env(app)
    }
    assert reads == {
        ("main-app", "HTTP_PORT"): 8000,
        ("main-app", "METRICS_PORT"): 9100,
        ("service-app", "METRICS_PORT"): 9101,
    }


# ----------------------------------------------------------------- running system


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def redis_server(docs, base: Path) -> RedisNode:
    """redis-server with the ci StatefulSet's own arguments (password from its Secret)."""
    (container,) = pod_spec(find(docs, "StatefulSet", "redis"))["containers"]
    password = secret_data(docs, secret_name(docs, "redis-credentials"))["REDIS_PASSWORD"]
    args = [a.replace("$(REDIS_PASSWORD)", password) for a in container["args"]]
    args[args.index("--dir") + 1] = str(base)
    shutil.which("redis-server") or pytest.fail("redis-server missing: `make services-deps`")
    return RedisNode(base, args=args)


def local_url(url: str, host: str, port: int) -> str:
    """The in-cluster URL of a Secret, pointed at the private node (credentials kept)."""
    return re.sub(rf"@{host}:\d+/", f"@127.0.0.1:{port}/", url)


@pytest.fixture(scope="module")
def backends(rendered, tmp_path_factory):
    """Private RabbitMQ booted with the ci overlay's definitions (its users, permissions
    and topology) and Redis with the ci StatefulSet's arguments and password."""
    if not (VENV_BIN / "python").exists():
        pytest.fail("the project venv is missing: run `make venv` (make test-k8s does)")
    docs = rendered["ci"]
    definitions = json.loads(secret_data(docs, secret_name(docs, "rabbitmq-definitions"))["definitions.json"])
    admin = secret_data(docs, secret_name(docs, "rabbitmq-credentials"))
    base = tmp_path_factory.mktemp("stack")
    rabbit = RabbitNode(
        base / "rabbitmq",
        name=f"k8s-test-{os.getpid()}",
        user=admin["RABBITMQ_ADMIN_USER"],
        password=admin["RABBITMQ_ADMIN_PASSWORD"],
        definitions=definitions,
    )
    redis = None
    try:
        rabbit.start(timeout=90)
        redis = redis_server(docs, base / "redis").start()
    except Exception as exc:  # noqa: BLE001
        rabbit.stop()
        if redis:
            redis.stop()
        pytest.fail(f"private RabbitMQ/Redis did not start ({exc}); `make services-deps` installs them")
    yield rabbit, redis
    rabbit.stop()
    redis.stop()


def secret_name(docs, prefix: str) -> str:
    names = [o["metadata"]["name"] for o in docs if o["kind"] == "Secret"]
    return next(n for n in names if n == prefix or n.startswith(prefix + "-"))


def tail(app: App) -> str:
    return app.proc.output()[-3000:]


@pytest.fixture(scope="module")
def system(rendered, backends, tmp_path_factory):
    """main-app and one service-app worker, configured as the ci overlay configures them:
    its ConfigMaps and its Secrets (each app connects as its own RabbitMQ user)."""
    rabbit, redis = backends
    docs = rendered["ci"]
    work = tmp_path_factory.mktemp("apps")
    token_file = work / "tokens"
    token_file.write_text(
        find(docs, "Secret", "main-app-api-tokens")["data"]
        and base64.b64decode(find(docs, "Secret", "main-app-api-tokens")["data"]["tokens"]).decode()
    )
    base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}
    base_env["PATH"] = f"{VENV_BIN}:{base_env.get('PATH', '/usr/bin:/bin')}"
    main = container_env(docs, "main-app")
    worker = container_env(docs, "service-app")
    main_env = {
        **base_env,
        **main,
        "RABBITMQ_URL": local_url(main["RABBITMQ_URL"], "rabbitmq", rabbit.amqp_port),
        "REDIS_URL": local_url(main["REDIS_URL"], "redis", redis.port),
        "API_TOKENS_FILE": str(token_file),
        "PROMETHEUS_MULTIPROC_DIR": str(work / "main-app-metrics"),
    }
    worker_env = {
        **base_env,
        **worker,
        "RABBITMQ_URL": local_url(worker["RABBITMQ_URL"], "rabbitmq", rabbit.amqp_port),
        "REDIS_URL": local_url(worker["REDIS_URL"], "redis", redis.port),
    }
    main_app = start_api(main_env, work, bin_dir=VENV_BIN)
    service_app = start_worker(worker_env, work, bin_dir=VENV_BIN)
    apps: list[App] = [main_app, service_app]
    try:
        for app in apps:
            wait_http(f"{app.url}/healthz", 60, interval=0.3)
    except (TimeoutError, RuntimeError) as exc:
        logs = "\n".join(f"--- {a.proc.name}\n{tail(a)}" for a in apps)
        for a in apps:
            a.stop()
        pytest.fail(f"{exc}\n{logs}")
    ports = {"http": main_app.port, "main-metrics": main_app.metrics_port, "worker-metrics": service_app.metrics_port}
    yield {"ports": ports, "token_file": token_file, "rabbit": rabbit, "apps": apps, "docs": docs}
    for a in apps:
        a.stop(40, group=True)
    for a in apps:
        assert a.proc.returncode == 0, f"{a.proc.name} exited {a.proc.returncode} on SIGTERM:\n{tail(a)}"


def test_probe_paths_answer_on_the_probed_ports(system):
    docs = system["docs"]
    port_of = {
        ("main-app", "http"): system["ports"]["http"],
        ("main-app", "metrics"): system["ports"]["main-metrics"],
        ("service-app", "metrics"): system["ports"]["worker-metrics"],
    }
    for app in ("main-app", "service-app"):
        (container,) = pod_spec(find(docs, "Deployment", app))["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            http = container[probe]["httpGet"]
            url = f"http://127.0.0.1:{port_of[(app, http['port'])]}{http['path']}"
            assert wait_http(url, timeout=30, interval=0.3) == 200, url


def test_metrics_served_on_metrics_port_not_api_port(system):
    p = system["ports"]
    assert get(f"http://127.0.0.1:{p['main-metrics']}/metrics")[0] == 200
    assert get(f"http://127.0.0.1:{p['http']}/metrics")[0] == 404
    assert get(f"http://127.0.0.1:{p['worker-metrics']}/metrics")[0] == 200


def test_smoke_job_script_passes_against_the_running_apps(system, diagnose):
    """The container `skaffold verify -p ci` runs (skaffold.yaml's verify container
    patched onto the Job manifest, as Skaffold does), against the running apps."""
    (case,) = diagnose("ci")[0]["verify"]
    job = skaffold_verify_job(case)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["python3", "-c"]
    env = {
        **os.environ,
        **{e["name"]: e["value"] for e in container["env"]},
        "BASE_URL": f"http://127.0.0.1:{system['ports']['http']}",
        "API_TOKENS_FILE": str(system["token_file"]),
        "SMOKE_TIMEOUT_SECONDS": "60",
    }
    proc = subprocess.run(
        [sys.executable, "-c", container["command"][2]], env=env, capture_output=True, text=True, timeout=120
    )
    logs = "\n".join(f"--- {a.proc.name}\n{tail(a)}" for a in system["apps"])
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert proc.stdout.count("ok   ") == 6


PROMQL_NON_METRICS = {
    "sum",
    "rate",
    "avg",
    "count",
    "by",
    "on",
    "avg_over_time",
    "histogram_quantile",
    "clamp_min",
    "increase",
    "and",
    "or",
    "unless",
    "le",
    "namespace",
    "pod",
    "queue",
    "route",
    "status",
    "outcome",
    "reason",
    "type",
    "method",
    "vhost",
    "humanize",
    "humanizeDuration",
    "humanizePercentage",
}


def metric_names_used(docs) -> set[str]:
    exprs = [t["metadata"]["query"] for o in docs if o["kind"] == "ScaledObject" for t in o["spec"]["triggers"]]
    rule = find(docs, "PrometheusRule", "jobs")
    exprs += [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    names = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}", "", expr)  # drop label matchers
        expr = re.sub(r"\[[^\]]*\]", "", expr)
        for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
            if token not in PROMQL_NON_METRICS and ":" not in token:  # recorded series are defined, not scraped
                names.add(token)
    return names


def exposed_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE ") or line.startswith("# HELP "):
            base = line.split()[2]
            names |= {base, base + "_total", base + "_bucket", base + "_sum", base + "_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_metric_names_in_keda_and_rules_are_exposed(system):
    p = system["ports"]
    # Traffic first, so labelled series exist (multiprocess mode only reports observed ones).
    token = system["token_file"].read_text().strip()
    req = urllib.request.Request(
        f"http://127.0.0.1:{p['http']}/jobs",
        data=b'{"type":"echo","payload":{}}',
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 202
    deadline = time.monotonic() + 30
    rabbit = system["rabbit"]
    sources = {}
    while time.monotonic() < deadline:
        sources = {
            "main-app": get(f"http://127.0.0.1:{p['main-metrics']}/metrics")[1],
            "service-app": get(f"http://127.0.0.1:{p['worker-metrics']}/metrics")[1],
            "rabbitmq": get(f"http://127.0.0.1:{rabbit.prometheus_port}/metrics/detailed?family=queue_coarse_metrics")[
                1
            ],
        }
        if (
            "jobs_worker_job_latency_seconds_bucket{" in sources["service-app"]
            and 'queue="jobs"' in sources["rabbitmq"]
        ):
            break
        time.sleep(1)
    exposed = set().union(*(exposed_names(t) for t in sources.values()))
    used = metric_names_used(system["docs"])
    assert {"jobs_api_http_requests_total", "jobs_worker_busy_ratio", "rabbitmq_detailed_queue_messages_ready"} <= used
    missing = sorted(used - exposed)
    assert not missing, f"used by KEDA/PrometheusRules but not exposed: {missing}"
    assert re.search(r'rabbitmq_detailed_queue_messages_ready\{[^}]*queue="jobs"', sources["rabbitmq"])


def test_broker_boots_with_least_privilege_users_from_the_overlay(backends):
    """The ci overlay's definitions load: an admin and one user per app whose
    permissions are the contract's (jobs_contract.access.PERMISSIONS)."""
    rabbit, _ = backends
    out = rabbit.ctl("list_permissions", "-p", "/", "-q", "--no-table-headers")
    perms = {line.split("\t")[0]: tuple(line.split("\t")[1:4]) for line in out.splitlines() if line.strip()}
    spec = importlib.util.spec_from_file_location("gen_secrets", ROOT / "k8s/scripts/gen-secrets.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    access = gen.load_access()
    for user, p in access.PERMISSIONS.items():
        assert perms[user] == (p.configure, p.write, p.read), user
    assert len(perms) == len(access.PERMISSIONS) + 1  # + the admin
    assert "guest" not in rabbit.ctl("list_users")
    queues = rabbit.ctl("list_queues", "-q", "--no-table-headers", "name", "type")
    assert re.search(r"^jobs\s+quorum$", queues, re.M), queues
