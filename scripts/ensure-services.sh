#!/usr/bin/env bash
# Make sure the RabbitMQ and Redis servers (Debian packages) are installed.
# The local stack and the tests run private nodes of them; the packages' own
# services are not used (and are not started by this install).
set -euo pipefail
RABBITMQ_BIN=${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}
missing=()
[ -x "$RABBITMQ_BIN/rabbitmq-server" ] || missing+=(rabbitmq-server)
command -v redis-server >/dev/null || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "error: ${missing[*]} not installed. On Debian/Ubuntu, as root:" >&2
  echo "  apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} from Debian's packages (their services are not started)"
# Keep the packages' init scripts from starting system-wide services.
created_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
trap '[ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
