#!/usr/bin/env bash
# Refresh the upstream manifests vendored under k8s/sandbox/addons/*/upstream/ from the Go module
# cache, at the versions pinned in k8s/sandbox/tools/*/go.mod
# (the same modules the add-on binaries are built from). Files are copied verbatim; every sandbox change lives in the
# kustomization.yaml beside each upstream/ directory.
#   vendor.sh        (needs Go; downloads the modules through the module proxy if not cached)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tools=$(cd "$here/../tools" && pwd)

moddir() {  # dir-of-go.mod module -> source dir in the module cache, at the version go.mod pins
  local v
  v=$(cd "$1" && go list -m -f '{{.Version}}' "$2")
  (cd "$1" && go mod download -json "$2@$v") | sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p'
}
copy() {  # src-dir dest-dir files...
  local src=$1 dst=$2; shift 2
  rm -rf "$dst"; mkdir -p "$dst"
  for f in "$@"; do install -D -m 0644 "$src/$f" "$dst/$f"; done
}

keda=$(moddir "$tools/keda" github.com/kedacore/keda/v2)
copy "$keda/config" "$here/keda/upstream" \
  $(cd "$keda/config" && find crd general rbac manager metrics-server service_account minimal -type f | sort)

po=$(moddir "$tools/prometheus-operator" github.com/prometheus-operator/prometheus-operator)
copy "$po/example" "$here/prometheus-operator/upstream" \
  $(cd "$po/example" && ls prometheus-operator-crd/monitoring.coreos.com_{prometheuses,servicemonitors,podmonitors,probes,prometheusrules,scrapeconfigs}.yaml) \
  $(cd "$po/example" && find rbac/prometheus-operator rbac/prometheus -type f \
      ! -name prometheus-operator-service-monitor.yaml ! -name prometheus.yaml | sort)

ms=$(moddir "$tools/metrics-server" sigs.k8s.io/metrics-server)
copy "$ms/manifests" "$here/metrics-server/upstream" $(cd "$ms/manifests" && find base -type f | sort)


lpp=$(moddir "$tools/local-path-provisioner" github.com/rancher/local-path-provisioner)
copy "$lpp/deploy" "$here/local-path-provisioner/upstream" local-path-storage.yaml

echo "vendored: local-path-provisioner $(basename "$lpp"), keda $(basename "$keda"), prometheus-operator $(basename "$po"), metrics-server $(basename "$ms")"
