"""`make run`: the whole system on this machine, no cluster needed.

Private RabbitMQ and Redis nodes under .run/ (never the machine's own
services), then main-app under gunicorn and N service-app workers, run by
honcho. Ctrl-C stops everything cleanly: honcho stops the apps (the workers
finish the jobs they are running and record their outcomes), and only then are
the nodes stopped. Dev credentials and an API token are generated on first run
into .run/dev.env (git-ignored; .run/ is readable by its owner only);
API_TOKENS is honoured when set.
"""

import argparse
import os
import secrets
import shlex
import sys
import time
from pathlib import Path

import honcho.command
import honcho.manager

from jobs_contract.access import MAIN_APP_USER, SERVICE_APP_USER, definitions
from jobs_devtools.stack import (
    ROOT,
    RabbitNode,
    RedisNode,
    api_command,
    wait_http,
    worker_command,
)

API = "http://127.0.0.1:8000"
PORTS = {"amqp": 5682, "dist": 25682, "prometheus": 15702, "management": 15682, "redis": 6389, "workers": 9101}
STOP_GRACE_SECONDS = 30  # after Ctrl-C, before honcho SIGKILLs what is still running


def load_or_create_env(run_dir: Path) -> dict[str, str]:
    """Dev credentials, generated once (no default credentials anywhere) and kept in .run/dev.env."""
    path = run_dir / "dev.env"
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)  # the Procfile, stack.env and rabbitmq.conf hold credentials too
    known = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line) if path.exists() else {}
    wanted = {
        "DEV_RABBITMQ_USER": lambda: "admin-" + secrets.token_hex(3),
        "DEV_RABBITMQ_PASSWORD": lambda: secrets.token_urlsafe(18),
        "DEV_RABBITMQ_MAIN_APP_PASSWORD": lambda: secrets.token_urlsafe(18),
        "DEV_RABBITMQ_SERVICE_APP_PASSWORD": lambda: secrets.token_urlsafe(18),
        "DEV_API_TOKEN": lambda: "dev-" + secrets.token_urlsafe(24),
    }
    if not set(wanted) <= set(known):
        known = {**{k: make() for k, make in wanted.items()}, **known}
        path.write_text("".join(f"{k}={v}\n" for k, v in known.items()))
        path.chmod(0o600)
    return known


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir).resolve()
    creds = load_or_create_env(run_dir)
    app_passwords = {MAIN_APP_USER: creds["DEV_RABBITMQ_MAIN_APP_PASSWORD"],
                     SERVICE_APP_USER: creds["DEV_RABBITMQ_SERVICE_APP_PASSWORD"]}
    admin = (creds["DEV_RABBITMQ_USER"], creds["DEV_RABBITMQ_PASSWORD"])
    # The broker boots with the topology and one least-privilege user per app;
    # the apps declare nothing themselves (DECLARE_TOPOLOGY=false).
    rabbit = RabbitNode(run_dir / "rabbitmq", name="jobs-dev", amqp_port=PORTS["amqp"], dist_port=PORTS["dist"],
                        prometheus_port=PORTS["prometheus"], management_port=PORTS["management"],
                        user=admin[0], password=admin[1], definitions=definitions(admin, app_passwords),
                        plugins=("rabbitmq_prometheus", "rabbitmq_management"))
    redis = RedisNode(run_dir / "redis", port=PORTS["redis"])

    token = os.environ.get("API_TOKENS") or creds["DEV_API_TOKEN"]
    venv_bin = Path(sys.executable).parent
    env = {
        "REDIS_URL": redis.url,
        "DECLARE_TOPOLOGY": "false",
        "API_TOKENS": token,
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": "8000",
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": "9100",
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
    }
    (run_dir / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    # Workers first: honcho gives the first process type PORT=<base>, <base>+1, ...
    procfile = "\n".join([
        f"worker: RABBITMQ_URL='{rabbit.url_for(SERVICE_APP_USER, app_passwords[SERVICE_APP_USER])}' "
        f"METRICS_HOST=127.0.0.1 METRICS_PORT=$PORT exec {shlex.join(worker_command(venv_bin))}",
        f"api: RABBITMQ_URL='{rabbit.url_for(MAIN_APP_USER, app_passwords[MAIN_APP_USER])}' "
        f"PROMETHEUS_MULTIPROC_DIR={run_dir / 'main-app-metrics'} "
        f"exec {shlex.join(api_command(venv_bin))}",
        f"ready: exec {venv_bin / 'python'} -m jobs_devtools.devstack banner --workers {args.workers}",
    ]) + "\n"
    (run_dir / "Procfile").write_text(procfile)
    os.chdir(ROOT)
    # The nodes run outside honcho and outlive the apps: honcho stops all its processes at once,
    # and a worker draining after Ctrl-C still needs RabbitMQ and Redis to settle and record the
    # jobs it is finishing. Their own sessions keep the terminal's Ctrl-C from reaching them.
    print(f"starting RabbitMQ and Redis (logs: {rabbit.log_dir}, {redis.base_dir / 'redis.log'})", flush=True)
    try:
        rabbit.start()  # `rabbitmq-server -detached`: a session of its own
        redis.start()
        # honcho SIGKILLs whatever is still running 5 s after Ctrl-C; a worker may drain for longer.
        honcho.manager.KILL_WAIT = STOP_GRACE_SECONDS
        honcho.command.main([
            "-f", str(run_dir / "Procfile"), "-e", str(run_dir / "stack.env"), "-d", str(ROOT),
            "start", "-p", str(PORTS["workers"]), "-c", f"worker={args.workers}",
        ])
    except SystemExit as stop:  # honcho's, once every app has exited
        returncode = stop.code if isinstance(stop.code, int) else 1
    else:
        returncode = 0
    finally:
        print("stopping Redis and RabbitMQ", flush=True)
        redis.stop()
        rabbit.stop()
        print("RabbitMQ and Redis stopped", flush=True)
    return returncode


def banner(args: argparse.Namespace) -> int:
    try:
        # Ready ten times in a row, on fresh connections: each gunicorn worker has its own broker
        # connection, and one answer says nothing of the other worker.
        wait_http(f"{API}/readyz", 120, streak=10, interval=0.1)
    except TimeoutError:
        print("main-app did not become ready within 120s; see the logs above", flush=True)
    token = os.environ["API_TOKENS"].split(",")[0]
    workers = ", ".join(f"http://127.0.0.1:{PORTS['workers'] + i}/metrics" for i in range(args.workers))
    print(f"""
  ┌ the stack is up ─────────────────────────────────────────────────────────
  │ API            {API}   (OpenAPI: {API}/openapi.json)
  │ API metrics    http://127.0.0.1:9100/metrics
  │ worker metrics {workers}
  │ RabbitMQ       amqp://127.0.0.1:{PORTS['amqp']}  UI http://127.0.0.1:{PORTS['management']}  \
metrics http://127.0.0.1:{PORTS['prometheus']}/metrics
  │ Redis          redis://127.0.0.1:{PORTS['redis']}
  │ dev credentials: .run/dev.env (admin, and one least-privilege user per app)
  │ Ctrl-C stops everything
  └──────────────────────────────────────────────────────────────────────────
  export TOKEN={token}
  curl -s -XPOST {API}/jobs -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
       -d '{{"type": "echo", "payload": {{"hello": "world"}}}}'
  curl -s {API}/jobs/<id> -H "Authorization: Bearer $TOKEN"
""", flush=True)
    while True:  # honcho stops the whole stack when any process exits
        time.sleep(3600)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start the stack in the foreground")
    run_parser.add_argument("--workers", type=int, default=2)
    run_parser.add_argument("--run-dir", default=str(ROOT / ".run"))
    banner_parser = sub.add_parser("banner", help="(internal) wait until ready, print the URLs")
    banner_parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    return run(args) if args.command == "run" else banner(args)


if __name__ == "__main__":
    sys.exit(main())
