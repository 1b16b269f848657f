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
PACKAGES=python3,python3-venv,ca-certificates

log() { printf '[build-base] %s\n' "$*" >&2; }

# The key changes when this script, the CA bundle or pip.conf change, so a base
# built on another machine (other TLS interception) is not reused by mistake.
key_inputs() {
  cat "$0"
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

# Use the same Debian mirror as this machine's apt configuration (first URIs:
# line of a deb822 source, else the first `deb` line), falling back to the
# public default.
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
  mirror="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
             | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
fi
if [[ -z "$mirror" ]]; then
  mirror="$(grep -hsE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"
security_mirror="${mirror%/debian}/debian-security"

work="$(mktemp -d "${TMPDIR:-/tmp}/python-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

log "debootstrap $SUITE from $mirror (this takes a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || { tail -n 40 "$work/debootstrap.log" >&2; exit 1; }

# apt sources like the official Debian images, so `apt-get install` works in builds.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb $security_mirror $SUITE-security main
SOURCES
# Keep images small, like the official images do.
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
  >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"

# This machine's CA certificates (dereferenced) and pip configuration.
tar -C /etc/ssl -chf - certs 2>/dev/null | tar -C "$rootfs/etc/ssl" -xf -
if [[ -f /etc/pip.conf ]]; then cp /etc/pip.conf "$rootfs/etc/pip.conf"; fi

# Trim what a container never uses.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/locale/* "$rootfs"/tmp/* "$rootfs"/var/tmp/*
: >"$rootfs/etc/machine-id"

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
