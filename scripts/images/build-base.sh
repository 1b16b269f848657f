#!/usr/bin/env bash
# Build (or reuse) a local Python base image from Debian bookworm with debootstrap.
#
# No image registry is reachable from the project's machines, so the Dockerfiles'
# default BASE_IMAGE (the official python slim image) cannot be pulled here. This
# script makes a stand-in: Debian bookworm (minbase) + python3 + python3-venv +
# ca-certificates, with this machine's /etc/ssl/certs (and /etc/pip.conf, if any)
# baked in so pip inside `docker build` can reach PyPI through TLS interception.
#
# Reuse order: image already in the engine with the same cache key -> cached
# tarball (docker load) -> debootstrap from scratch (a few minutes), then the
# tarball is saved for the next run.
#
# Usage: build-base.sh [TAG]     (env: DOCKER, IMAGES_CACHE_DIR, DEBIAN_MIRROR)
set -euo pipefail

TAG="${1:-${BASE_TAG:-jobs-local/python-base:bookworm}}"
DOCKER="${DOCKER:-docker}"
CACHE_DIR="${IMAGES_CACHE_DIR:-.cache/images}"
SUITE=bookworm
PACKAGES=python3,python3-venv

log() { printf '[build-base] %s\n' "$*" >&2; }

# The key changes when this script, the CA bundle or pip.conf change, so a base
# built on another machine (other TLS interception) is not reused by mistake.
key_inputs() {
  cat "$0" "$(dirname "$0")/debian-rootfs.sh"
  cat /etc/ssl/certs/ca-certificates.crt 2>/dev/null || true
  cat /etc/pip.conf 2>/dev/null || true
}
KEY="$(key_inputs | sha256sum | cut -c1-16)"
TARBALL="$CACHE_DIR/python-base-$SUITE-$KEY.tar.gz"

current_key="$("$DOCKER" image inspect --format '{{ index .Config.Labels "local.base.key" }}' "$TAG" 2>/dev/null || true)"
if [[ "$current_key" == "$KEY" ]]; then
  log "reusing $TAG (key $KEY) already in the engine"
  exit 0
fi

if [[ -s "$TARBALL" ]]; then
  log "loading cached $TARBALL"
  if gzip -dc "$TARBALL" | "$DOCKER" load >/dev/null; then
    current_key="$("$DOCKER" image inspect --format '{{ index .Config.Labels "local.base.key" }}' "$TAG" 2>/dev/null || true)"
    if [[ "$current_key" == "$KEY" ]]; then
      log "loaded $TAG from cache"
      exit 0
    fi
  fi
  log "cached tarball unusable; rebuilding"
  rm -f "$TARBALL"
fi

if [[ $EUID -ne 0 ]]; then
  log "error: debootstrap needs root"; exit 1
fi
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
fi

# debian_mirror, debootstrap_debian (shared with k8s/sandbox/images/build.sh)
# shellcheck source=scripts/images/debian-rootfs.sh
source "$(dirname "$0")/debian-rootfs.sh"
mirror="$(debian_mirror)"

work="$(mktemp -d "${TMPDIR:-/tmp}/python-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

log "debootstrap $SUITE from $mirror (this takes a few minutes)"
debootstrap_debian "$SUITE" "$rootfs" "$mirror" "$work/debootstrap.log" "$PACKAGES" || exit 1

# This machine's CA certificates (dereferenced) and pip configuration.
tar -C /etc/ssl -chf - certs 2>/dev/null | tar -C "$rootfs/etc/ssl" -xf -
if [[ -f /etc/pip.conf ]]; then cp /etc/pip.conf "$rootfs/etc/pip.conf"; fi

log "importing $TAG"
tar -C "$rootfs" --numeric-owner -cf - . | "$DOCKER" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change "LABEL local.base.key=$KEY" \
  --change "LABEL org.opencontainers.image.description=\"Local stand-in for python:3.11-slim-bookworm (debootstrap $SUITE + python3)\"" \
  --change 'CMD ["python3"]' \
  - "$TAG" >/dev/null

# Old bases (and app images built on them) left untagged: free their space.
"$DOCKER" image prune -f --filter label=local.base.key >/dev/null || true

mkdir -p "$CACHE_DIR"
rm -f "$CACHE_DIR"/python-base-"$SUITE"-*.tar.gz
"$DOCKER" save "$TAG" | gzip -1 >"$TARBALL.tmp" && mv "$TARBALL.tmp" "$TARBALL"
log "built $TAG (key $KEY); cached as $TARBALL ($(du -h "$TARBALL" | cut -f1))"
