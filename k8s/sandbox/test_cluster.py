#!/usr/bin/env python3
"""The README's cluster paths, run for real against the sandbox (make test-cluster).

1. deploy: `make deploy` (skaffold build, deploy and the smoke-test verify, profile ci).
2. smoke: through the cluster's main-app Service (kubectl port-forward), authenticated:
   submit every job type and poll each to its expected final state.
3. pod_security: a privileged pod in `jobs` is refused by PodSecurity admission.
4. network_policy: a pod without the api-client label cannot reach main-app; one with it can.
5. tilt: `make undeploy`, then `tilt ci` on the dev overlay (what `make dev` runs).
6. live_update: `tilt up`, change a served string in main-app/main_app, and the running
   pod serves it without an image rebuild (same pod, same image); the change is reverted.

Prints a table and ends with the line
`cluster: deploy=ok tilt=ok live_update=ok smoke=ok pod_security=enforced network_policy=enforced`
(each item `ok`/`enforced` or what failed); exits non-zero on any shortfall. Stdlib only.
Expects PATH to hold skaffold, tilt and kubectl, and KUBECONFIG the sandbox's (make test-cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from jobs_devtools.stack import free_port, wait_for_port

REPO = pathlib.Path(__file__).resolve().parents[2]
NAMESPACE = "jobs"
HEALTHZ_SOURCE = REPO / "main-app" / "main_app" / "views.py"
HEALTHZ_BODY = b'{"status":"ok"}'
# Every job type and what it must end as (the catalog's documented behaviour).
EXPECTED = {
    "echo": ("succeeded", {"type": "echo", "payload": {"hello": "cluster"}}),
    "sleep": ("succeeded", {"type": "sleep", "payload": {"seconds": 0.2}}),
    "cpu": ("succeeded", {"type": "cpu", "payload": {"ms": 10}}),
    "fail": ("failed", {"type": "fail", "payload": {}}),
    "flaky": ("succeeded", {"type": "flaky", "payload": {"fail_times": 1}}),
}


class Shortfall(Exception):
    """A step did not do what the README promises."""


def run(cmd: list[str], *, timeout: float, log: pathlib.Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    with log.open("ab") as out:
        out.write(("\n$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise Shortfall(f"`{' '.join(cmd)}` exited {proc.returncode} (log: {log})")
    return proc


def kubectl(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["kubectl", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise Shortfall(f"kubectl {' '.join(args)}: {proc.stderr.strip()[-400:]}")
    return proc


@contextlib.contextmanager
def port_forward(target: str, remote: int, log: pathlib.Path):
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(["kubectl", "-n", NAMESPACE, "port-forward", target, f"{port}:{remote}"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, 30, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise Shortfall(f"kubectl port-forward {target}: {exc}") from None
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def call(base: str, method: str, path: str, body=None, token: str | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None, b""


def api_token(overlay: str) -> str:
    path = REPO / "k8s" / "overlays" / overlay / "secrets" / "api-tokens"
    return next(t for t in (line.strip() for line in path.read_text().splitlines()) if t and not t.startswith("#"))


# ---------------------------------------------------------------- steps
def step_deploy(log: pathlib.Path) -> str:
    run(["make", "deploy", "PROFILE=ci"], timeout=1800, log=log)
    return "ok"


def step_smoke(log: pathlib.Path, overlay: str = "ci") -> str:
    token = api_token(overlay)
    with port_forward("svc/main-app", 8000, log) as base:
        status, _ = call(base, "POST", "/jobs", {"type": "echo", "payload": {}})
        if status != 401:
            raise Shortfall(f"POST /jobs without a token answered {status}, not 401")
        ids = {}
        for name, (_, body) in EXPECTED.items():
            status, raw = call(base, "POST", "/jobs", body, token)
            if status != 202:
                raise Shortfall(f"POST /jobs {name} answered {status}: {raw[:200]!r}")
            ids[name] = json.loads(raw)["id"]
        deadline = time.monotonic() + 180
        final: dict[str, dict] = {}
        while len(final) < len(ids) and time.monotonic() < deadline:
            for name, job_id in ids.items():
                if name in final:
                    continue
                status, raw = call(base, "GET", f"/jobs/{job_id}", token=token)
                job = json.loads(raw) if status == 200 else {}
                if job.get("status") in ("succeeded", "failed"):
                    final[name] = job
            time.sleep(1)
        for name, (want, _) in EXPECTED.items():
            got = final.get(name, {}).get("status", "not finished")
            print(f"  job {name:6} -> {got}", flush=True)
            if got != want:
                raise Shortfall(f"job {name} ended {got}, expected {want}")
        if final["echo"].get("result") != {"hello": "cluster"}:
            raise Shortfall(f"echo's result is {final['echo'].get('result')!r}")
    return "ok"


def step_pod_security(log: pathlib.Path) -> str:
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "psa-probe-privileged", "namespace": NAMESPACE},
        "spec": {"containers": [{"name": "c", "image": "localhost:5000/sandbox/pause:3.10",
                                 "securityContext": {"privileged": True}}]},
    }
    proc = subprocess.run(["kubectl", "apply", "--dry-run=server", "-f", "-"], input=json.dumps(pod),
                          capture_output=True, text=True, timeout=60)
    with log.open("a") as out:
        out.write(proc.stdout + proc.stderr)
    if proc.returncode == 0:
        raise Shortfall("a privileged pod in namespace jobs was admitted")
    if "violates PodSecurity" not in proc.stderr:
        raise Shortfall(f"privileged pod refused, but not by PodSecurity: {proc.stderr.strip()[-300:]}")
    return "enforced"


def probe_pod(name: str, image: str, labels: dict[str, str]) -> dict:
    # Keep trying for 20 s: the policy enforcer programs a new pod's rules a moment after it starts.
    script = ("import sys,time,urllib.request\n"
              "deadline = time.monotonic() + 20\n"
              "while True:\n"
              " try:\n  urllib.request.urlopen('http://main-app:8000/healthz', timeout=3); print('reached'); break\n"
              " except Exception as e:\n"
              "  if time.monotonic() > deadline: print('blocked', type(e).__name__); sys.exit(3)\n"
              "  time.sleep(1)\n")
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe", "image": image, "command": ["python3", "-c", script],
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}},
            }],
        },
    }


def run_probe(pod: dict, log: pathlib.Path) -> str:
    name = pod["metadata"]["name"]
    kubectl("-n", NAMESPACE, "delete", "pod", name, "--ignore-not-found", "--wait=true")
    subprocess.run(["kubectl", "apply", "-f", "-"], input=json.dumps(pod), check=True, capture_output=True, text=True)
    deadline = time.monotonic() + 120
    phase = ""
    while time.monotonic() < deadline:
        phase = kubectl("-n", NAMESPACE, "get", "pod", name, "-o", "jsonpath={.status.phase}").stdout
        if phase in ("Succeeded", "Failed"):
            break
        time.sleep(1)
    out = kubectl("-n", NAMESPACE, "logs", name, check=False).stdout.strip()
    with log.open("a") as fh:
        fh.write(f"{name}: phase={phase} logs={out}\n")
    kubectl("-n", NAMESPACE, "delete", "pod", name, "--ignore-not-found", "--wait=false")
    return out


def step_network_policy(log: pathlib.Path) -> str:
    image = kubectl("-n", NAMESPACE, "get", "deploy", "main-app",
                    "-o", "jsonpath={.spec.template.spec.containers[0].image}").stdout
    allowed = run_probe(probe_pod("np-probe-client", image, {"jobs.example.com/api-client": "true"}), log)
    if not allowed.startswith("reached"):
        raise Shortfall(f"a pod WITH the api-client label could not reach main-app: {allowed!r}")
    denied = run_probe(probe_pod("np-probe-stranger", image, {}), log)
    if not denied.startswith("blocked"):
        raise Shortfall(f"a pod WITHOUT the api-client label reached main-app: {denied!r}")
    return "enforced"


def step_tilt(log: pathlib.Path) -> str:
    run(["make", "undeploy", "PROFILE=ci"], timeout=600, log=log)
    run(["tilt", "ci", "--timeout", "15m"], timeout=1200, log=log)
    return "ok"


@contextlib.contextmanager
def edited(path: pathlib.Path, old: bytes, new: bytes):
    original = path.read_bytes()
    if original.count(old) != 1:
        raise Shortfall(f"{path} no longer holds exactly one {old!r}: update test_cluster.py")
    path.write_bytes(original.replace(old, new))
    try:
        yield
    finally:
        path.write_bytes(original)


def main_app_pod() -> tuple[str, str]:
    pods = json.loads(kubectl("-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/name=main-app",
                              "-o", "json").stdout)["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    if len(running) != 1:
        raise Shortfall(f"expected one running main-app pod, found {len(running)}")
    pod = running[0]
    return pod["metadata"]["name"], pod["status"]["containerStatuses"][0]["imageID"]


def step_live_update(log: pathlib.Path) -> str:
    with log.open("ab") as out:
        tilt = subprocess.Popen(["tilt", "up", "--stream=true"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["tilt", "get", "session"], capture_output=True).returncode != 0:
            if tilt.poll() is not None or time.monotonic() > deadline:
                raise Shortfall(f"tilt up did not start its API server (log: {log})")
            time.sleep(1)
        # The API server answers before the Tiltfile has been loaded: `tilt wait` on a resource
        # that does not exist yet fails at once (NotFound), so wait for it to exist first.
        while subprocess.run(["tilt", "get", "uiresource", "main-app"], capture_output=True).returncode != 0:
            if tilt.poll() is not None or time.monotonic() > deadline + 120:
                raise Shortfall(f"tilt up never created resource main-app (log: {log})")
            time.sleep(1)
        run(["tilt", "wait", "--for=condition=Ready", "uiresource/main-app", "--timeout=600s"], timeout=660, log=log)
        pod_before, image_before = main_app_pod()
        nonce = uuid.uuid4().hex[:12]
        with edited(HEALTHZ_SOURCE, HEALTHZ_BODY, b'{"status":"ok","live_update":"%s"}' % nonce.encode()), \
                port_forward(f"pod/{pod_before}", 8000, log) as base:
            deadline = time.monotonic() + 120
            body = b""
            while time.monotonic() < deadline:
                status, body = call(base, "GET", "/healthz")
                if status == 200 and nonce.encode() in body:
                    break
                time.sleep(1)
            else:
                raise Shortfall(f"the running pod never served the edited string (last body {body[:100]!r})")
        pod_after, image_after = main_app_pod()
        if (pod_after, image_after) != (pod_before, image_before):
            raise Shortfall(f"the change replaced the pod or image ({pod_before} -> {pod_after})")
        return "ok"
    finally:
        os.killpg(tilt.pid, signal.SIGINT)
        try:
            tilt.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(tilt.pid, signal.SIGKILL)
        run(["tilt", "down"], timeout=300, log=log, check=False)


STEPS = [
    ("deploy", step_deploy),
    ("smoke", step_smoke),
    ("pod_security", step_pod_security),
    ("network_policy", step_network_policy),
    ("tilt", step_tilt),
    ("live_update", step_live_update),
]
# Final line order, as the issue states it.
SUMMARY_ORDER = ["deploy", "tilt", "live_update", "smoke", "pod_security", "network_policy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report-dir", default="reports/cluster")
    parser.add_argument("--only", nargs="*", help="run only these steps")
    args = parser.parse_args()
    report = REPO / args.report_dir
    report.mkdir(parents=True, exist_ok=True)
    results: dict[str, tuple[str, float, str]] = {}
    for name, fn in STEPS:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            results[name] = (fn(report / f"{name}.log"), time.monotonic() - started, "")
        except (Shortfall, subprocess.SubprocessError, OSError, KeyError, ValueError) as exc:
            results[name] = ("failed", time.monotonic() - started, str(exc))
        print(f"   {name}: {results[name][0]} {results[name][2]}", flush=True)
        if name == "deploy" and results[name][0] != "ok":
            break  # nothing else can run without the deployment
    print()
    print(f"{'step':16} {'result':10} {'seconds':>8}  detail")
    for name, (result, secs, detail) in results.items():
        print(f"{name:16} {result:10} {secs:8.1f}  {detail[:150]}")
    wanted = [n for n in SUMMARY_ORDER if not args.only or n in args.only]
    line = " ".join(f"{n}={results.get(n, ('not-run',))[0]}" for n in wanted)
    print(f"cluster: {line}")
    return 0 if all(results.get(n, ("not-run",))[0] in ("ok", "enforced") for n in wanted) else 1


if __name__ == "__main__":
    sys.exit(main())
