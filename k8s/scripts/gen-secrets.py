#!/usr/bin/env python3
"""Generate random credentials for a local overlay (dev, ci) into OVERLAY/secrets/.

The overlay's kustomization turns these git-ignored files into Secrets with a
secretGenerator. Nothing is written when all files already exist (so the Secrets, and
the broker's stored password, stay stable across runs); --force rotates everything.
For prod, create the same Secrets outside the repo (see docs/kubernetes.md#secrets).

Usage: gen-secrets.py k8s/overlays/dev [--force]
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

FILES = ("rabbitmq.env", "redis.env", "main-app.env", "service-app.env", "api-tokens")


def render() -> dict[str, str]:
    rabbit_user = "jobs-admin"
    rabbit_pass = secrets.token_hex(24)  # URL-safe: goes into amqp:// URLs unquoted
    cookie = secrets.token_hex(32).upper()
    redis_pass = secrets.token_hex(24)
    api_token = secrets.token_urlsafe(32)
    # Until per-app RabbitMQ users exist (loaded from definitions), both apps use the
    # broker's default user. Each app already has its own Secret, so moving to
    # least-privilege users only changes what is written here.
    amqp_url = f"amqp://{rabbit_user}:{rabbit_pass}@rabbitmq:5672/%2F"
    redis_url = f"redis://:{redis_pass}@redis:6379/0"
    return {
        "rabbitmq.env": (
            f"RABBITMQ_DEFAULT_USER={rabbit_user}\n"
            f"RABBITMQ_DEFAULT_PASS={rabbit_pass}\n"
            f"RABBITMQ_ERLANG_COOKIE={cookie}\n"
        ),
        "redis.env": f"REDIS_PASSWORD={redis_pass}\n",
        "main-app.env": f"RABBITMQ_URL={amqp_url}\nREDIS_URL={redis_url}\n",
        "service-app.env": f"RABBITMQ_URL={amqp_url}\nREDIS_URL={redis_url}\n",
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
