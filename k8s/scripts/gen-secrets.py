#!/usr/bin/env python3
"""Generate random credentials for a local overlay (dev, ci) into OVERLAY/secrets/.

The overlay's kustomization turns these git-ignored files into Secrets with a
secretGenerator:

  rabbitmq.env       RABBITMQ_ADMIN_USER, RABBITMQ_ADMIN_PASSWORD, RABBITMQ_ERLANG_COOKIE
  definitions.json   RabbitMQ definitions loaded at boot: topology, the admin and one
                     least-privilege user per app (jobs_contract.access, the same
                     definition the local stack boots with)
  redis.env          REDIS_PASSWORD
  main-app.env       RABBITMQ_URL (as user main-app), REDIS_URL
  service-app.env    RABBITMQ_URL (as user service-app), REDIS_URL
  api-tokens         one API token

Nothing is written when all files already exist (so the Secrets stay stable across
runs); --force rotates everything. For prod, create the same Secrets outside the repo
(docs/kubernetes.md#secrets). Standard library only: the contract's access/topology
modules are loaded straight from contract/ (they need nothing else).

Usage: gen-secrets.py k8s/overlays/dev [--force]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import sys
import types
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[2]
FILES = ("rabbitmq.env", "definitions.json", "redis.env", "main-app.env", "service-app.env", "api-tokens")


def load_access() -> types.ModuleType:
    """jobs_contract.access without importing the package (its __init__ needs redis,
    jsonschema, ...): a bare package whose submodules are loaded from contract/."""
    pkg_dir = ROOT / "contract" / "jobs_contract"
    if "jobs_contract" not in sys.modules:
        pkg = types.ModuleType("jobs_contract")
        pkg.__path__ = [str(pkg_dir)]
        sys.modules["jobs_contract"] = pkg
    for name in ("topology", "access"):
        full = f"jobs_contract.{name}"
        if full not in sys.modules:
            spec = importlib.util.spec_from_file_location(full, pkg_dir / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module
            spec.loader.exec_module(module)
            setattr(sys.modules["jobs_contract"], name, module)
    return sys.modules["jobs_contract.access"]


def render() -> dict[str, str]:
    access = load_access()
    admin_user = "jobs-admin"
    admin_pass = secrets.token_urlsafe(24)
    app_passwords = {user: secrets.token_urlsafe(24) for user in access.PERMISSIONS}
    cookie = secrets.token_hex(32).upper()
    redis_pass = secrets.token_hex(24)
    api_token = secrets.token_urlsafe(32)
    definitions = access.definitions((admin_user, admin_pass), app_passwords)

    def amqp_url(user: str) -> str:
        return f"amqp://{quote(user, safe='')}:{quote(app_passwords[user], safe='')}@rabbitmq:5672/%2F"

    redis_url = f"redis://:{redis_pass}@redis:6379/0"
    return {
        "rabbitmq.env": (
            f"RABBITMQ_ADMIN_USER={admin_user}\n"
            f"RABBITMQ_ADMIN_PASSWORD={admin_pass}\n"
            f"RABBITMQ_ERLANG_COOKIE={cookie}\n"
        ),
        "definitions.json": json.dumps(definitions, indent=2) + "\n",
        "redis.env": f"REDIS_PASSWORD={redis_pass}\n",
        "main-app.env": f"RABBITMQ_URL={amqp_url(access.MAIN_APP_USER)}\nREDIS_URL={redis_url}\n",
        "service-app.env": f"RABBITMQ_URL={amqp_url(access.SERVICE_APP_USER)}\nREDIS_URL={redis_url}\n",
        "api-tokens": f"{api_token}\n",
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlay", type=Path, help="overlay directory, e.g. k8s/overlays/dev")
    parser.add_argument("--force", action="store_true", help="rotate existing credentials")
    args = parser.parse_args(argv)
    if not (args.overlay / "kustomization.yaml").is_file():
        parser.error(f"{args.overlay} is not a kustomize overlay")
    out = args.overlay / "secrets"
    if not args.force and all((out / name).is_file() for name in FILES):
        return 0
    out.mkdir(mode=0o700, exist_ok=True)
    for name, content in render().items():
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
    print(f"generated credentials in {out}/ (git-ignored); API token: {out / 'api-tokens'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
