# shellcheck shell=bash
# Shared by scripts/images/build-base.sh and k8s/sandbox/images/build.sh (source it):
# a Debian root filesystem made with debootstrap, configured like Debian's official slim
# images, for bases built on a machine that reaches no image registry.

# This machine's Debian mirror: DEBIAN_MIRROR, else the first URIs: line of a deb822 source,
# else the first `deb` line, else the public default.
debian_mirror() {
  local m="${DEBIAN_MIRROR:-}"
  [[ -n "$m" ]] || m="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
                          | awk '{print $2}' | grep -v -- '-security' | head -n1 || true)"
  [[ -n "$m" ]] || m="$(grep -hsE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)"
  printf '%s' "${m:-http://deb.debian.org/debian}"
}

# debootstrap_debian SUITE ROOTFS MIRROR LOGFILE [PACKAGES]: minbase + ca-certificates (+ PACKAGES,
# comma-separated) into ROOTFS, with apt sources, no recommends, no docs/man/locales, the apt cache
# cleaned after installs, services never started by package scripts, and trimmed.
debootstrap_debian() {
  local suite=$1 rootfs=$2 mirror=$3 logf=$4 packages=ca-certificates${5:+,$5}
  debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$logf" 2>&1 \
    || { tail -n 40 "$logf" >&2; return 1; }
  cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb ${mirror%/debian}/debian-security $suite-security main
SOURCES
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-excludes" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
DPKG
  printf '#!/bin/sh\n# no services in image builds\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
  # Trim what a container never uses.
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log \
         "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
         "$rootfs"/tmp/* "$rootfs"/var/tmp/*
  : >"$rootfs/etc/machine-id"
}
