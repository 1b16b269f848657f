"""Least-privilege RabbitMQ users, one per app, and the broker definitions that create them.

main-app may only publish to the "jobs" exchange. service-app may only consume
from the "jobs" queue and publish retries to "jobs.delay"; dead-lettering is done
by the broker itself and needs no permission. Neither may declare or delete
anything: the topology is created from these definitions (RabbitMQ's
`load_definitions`) by an administrator, and the apps run with DECLARE_TOPOLOGY=false.

    python -m jobs_contract.access > definitions.json

reads the passwords from RABBITMQ_ADMIN_USER / RABBITMQ_ADMIN_PASSWORD,
RABBITMQ_MAIN_APP_PASSWORD and RABBITMQ_SERVICE_APP_PASSWORD.
"""

import base64
import hashlib
import json
import os
import re
import secrets
import sys
from dataclasses import dataclass
from typing import Any

from jobs_contract import topology

MAIN_APP_USER = "main-app"
SERVICE_APP_USER = "service-app"


@dataclass(frozen=True)
class Permission:
    configure: str
    write: str
    read: str


NOTHING = "^$"

PERMISSIONS: dict[str, Permission] = {
    MAIN_APP_USER: Permission(configure=NOTHING, write=f"^{re.escape(topology.EXCHANGE)}$", read=NOTHING),
    SERVICE_APP_USER: Permission(
        configure=NOTHING, write=f"^{re.escape(topology.DELAY_EXCHANGE)}$", read=f"^{re.escape(topology.QUEUE)}$"
    ),
}


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(admin: tuple[str, str], app_passwords: dict[str, str], vhost: str = "/") -> dict[str, Any]:
    """Topology, an administrator and one least-privilege user per app, as a definitions document."""
    missing = set(PERMISSIONS) - set(app_passwords)
    if missing:
        raise ValueError(f"no password for {', '.join(sorted(missing))}")
    users = [{"name": admin[0], "password_hash": password_hash(admin[1]),
              "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]}]
    users += [{"name": name, "password_hash": password_hash(app_passwords[name]),
               "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []} for name in PERMISSIONS]
    permissions = [{"user": admin[0], "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}]
    permissions += [{"user": name, "vhost": vhost, "configure": p.configure, "write": p.write, "read": p.read}
                    for name, p in PERMISSIONS.items()]
    return {"users": users, "vhosts": [{"name": vhost}], "permissions": permissions,
            **topology.definitions(vhost)}


def main() -> int:
    try:
        admin = (os.environ["RABBITMQ_ADMIN_USER"], os.environ["RABBITMQ_ADMIN_PASSWORD"])
        passwords = {MAIN_APP_USER: os.environ["RABBITMQ_MAIN_APP_PASSWORD"],
                     SERVICE_APP_USER: os.environ["RABBITMQ_SERVICE_APP_PASSWORD"]}
    except KeyError as exc:
        print(f"error: {exc.args[0]} is not set", file=sys.stderr)
        return 2
    if not all(admin) or not all(passwords.values()):
        print("error: empty user name or password", file=sys.stderr)
        return 2
    json.dump(definitions(admin, passwords), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
