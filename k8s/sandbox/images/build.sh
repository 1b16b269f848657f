#!/usr/bin/env bash
# Build every image the sandbox cluster needs and push it to the sandbox registry.
#
#   build.sh [--force] [NAME...]   build (if needed) and push NAME (default: all, in table order);
#                                  --force: rebuild without the build cache (docker build --no-cache)
#   build.sh --list                print the image references, one a line
#
# No image registry is reachable from the project's machines, so everything is built here:
# - pause: k8s.io/kubernetes' build/pause/linux/pause.c (from the Go module cache), gcc -static;
# - the add-ons (CoreDNS, metrics-server, kube-router, local-path-provisioner, KEDA, Prometheus
#   Operator): static Go binaries from k8s/sandbox/tools/build.sh, FROM scratch (kube-router
#   enforces NetworkPolicies: this VM's kernel cannot run kube-network-policies, what kind uses;
#   local-path-provisioner is kind's default StorageClass; busybox serves its helper pods);
# - Debian-package images (Prometheus, busybox, and the stand-ins RabbitMQ and Redis) on a local
#   debootstrap trixie base `sandbox-base/debian:trixie`;
# - Locust on the project's Python base `jobs-local/python-base:bookworm`
#   (scripts/images/build-base.sh, as `make images-base`).
# The Docker engine is the project's (scripts/images/dockerd.sh start).
#
# Fast when nothing changed: each image carries a label `sandbox.image.key`, a hash of its
# Dockerfile directory, its inputs (binaries' cache key, pause.c, base image key, lock file) and
# its tag. An image whose key matches the last push and whose manifest digest the registry still
# serves is skipped (one HTTP HEAD); one whose key matches a local image is only pushed.
# The debootstrap base is cached as a tarball in $SANDBOX_IMAGES_CACHE (outside the repo).
#
# Env: REGISTRY (default localhost:5000; must answer plain HTTP, e.g. Debian's docker-registry),
#      DOCKER (client; default /usr/bin/docker when present), SANDBOX_CACHE (default
#      /var/cache/jobs-sandbox), SANDBOX_IMAGES_CACHE (default $SANDBOX_CACHE/images),
#      DEBIAN_MIRROR (default: this machine's apt mirror, else http://deb.debian.org/debian).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
REGISTRY=${REGISTRY:-localhost:5000}
if [[ -z "${DOCKER:-}" ]]; then DOCKER=docker; [[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker; fi
export DOCKER
SANDBOX_CACHE=${SANDBOX_CACHE:-/var/cache/jobs-sandbox}
IMAGES_CACHE=${SANDBOX_IMAGES_CACHE:-$SANDBOX_CACHE/images}
export DOCKER_BUILDKIT=1
PAUSE_K8S_VERSION=v1.34.4      # k8s.io/kubernetes module whose build/pause/linux/pause.c is built
DEBIAN_BASE_SUITE=trixie

# name | tag | recipe | tag aliases. Recipes:
#   tool:<tools module>:<binary>:<file in image>   binary from k8s/sandbox/tools/build.sh
#   pause | debian | python                         see above
# The tags of the Go add-ons must match the module versions in their go.mod (checked below);
# the Debian ones the package's upstream version (checked in the Dockerfile).
IMAGES=(
  "pause|3.10|pause|3.10.1"
  "coredns|v1.12.4|tool:coredns:coredns:coredns|"
  "metrics-server|v0.8.0|tool:metrics-server:metrics-server:metrics-server|"
  "kube-router|v2.1.0|tool:kube-router:kube-router:kube-router|"
  "local-path-provisioner|v0.0.30|tool:local-path-provisioner:local-path-provisioner:local-path-provisioner|"
  "busybox|1.37.0|debian|"
  "keda|2.20.2|tool:keda:operator:keda|"
  "keda-metrics-apiserver|2.20.2|tool:keda:adapter:keda-adapter|"
  "prometheus-operator|v0.93.0|tool:prometheus-operator:operator:operator|"
  "prometheus-config-reloader|v0.93.0|tool:prometheus-operator:prometheus-config-reloader:prometheus-config-reloader|"
  "prometheus|v2.53.3|debian|"
  "rabbitmq|4.0.5-management|debian|"
  "redis|8.0.2|debian|"
  "locust|2.47.0|python|"
)
# Module path per tool (for the version check against go.mod).
declare -A TOOL_MODULE=(
  [kube-router]=github.com/cloudnativelabs/kube-router/v2
  [local-path-provisioner]=github.com/rancher/local-path-provisioner
  [coredns]=github.com/coredns/coredns
  [metrics-server]=sigs.k8s.io/metrics-server
  [keda]=github.com/kedacore/keda/v2
  [prometheus-operator]=github.com/prometheus-operator/prometheus-operator
)

log() { printf '[sandbox-images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
ref_of() { printf '%s/sandbox/%s:%s' "$REGISTRY" "$1" "$2"; }

force=
names=()
for arg in "$@"; do
  case "$arg" in
    --list) for row in "${IMAGES[@]}"; do IFS='|' read -r n t _ a <<<"$row"; ref_of "$n" "$t"; echo
              for x in $a; do ref_of "$n" "$x"; echo; done; done; exit 0 ;;
    --force) force=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    -*) die "unknown option $arg" ;;
    *) names+=("$arg") ;;
  esac
done
if [[ ${#names[@]} -gt 0 ]]; then
  for n in "${names[@]}"; do
    printf '%s\n' "${IMAGES[@]}" | grep -q "^$n|" || die "unknown image $n (see --list)"
  done
fi

# ---------------------------------------------------------------------------------------------
# Bases

# debian_mirror, debootstrap_debian (shared with scripts/images/build-base.sh)
# shellcheck source=scripts/images/debian-rootfs.sh
source "$repo/scripts/images/debian-rootfs.sh"

# Ensure sandbox-base/debian:SUITE is in the engine: engine (same key) -> cached tarball ->
# debootstrap (about 1 minute). Prints the key.
ensure_debian_base() {
  local suite=$1 tag="sandbox-base/debian:$1" mirror key tarball cur work
  mirror=$(debian_mirror)
  key=$( { declare -f debootstrap_debian; echo "$suite $mirror"; } | sha256sum | cut -c1-16)
  tarball="$IMAGES_CACHE/debian-$suite-$key.tar.gz"
  cur=$("$DOCKER" image inspect --format '{{ index .Config.Labels "sandbox.base.key" }}' "$tag" 2>/dev/null || true)
  if [[ "$cur" == "$key" ]]; then echo "$key"; return; fi
  if [[ -s "$tarball" ]]; then
    log "loading $tag from $tarball"
    if gzip -dc "$tarball" | "$DOCKER" load >/dev/null; then
      cur=$("$DOCKER" image inspect --format '{{ index .Config.Labels "sandbox.base.key" }}' "$tag" 2>/dev/null || true)
      [[ "$cur" == "$key" ]] && { echo "$key"; return; }
    fi
    log "cached $tarball unusable; rebuilding"; rm -f "$tarball"
  fi
  [[ $EUID -eq 0 ]] || die "debootstrap needs root"
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
  fi
  [[ -e "/usr/share/debootstrap/scripts/$suite" ]] || die "this debootstrap does not know $suite"
  work=$(mktemp -d "${TMPDIR:-/tmp}/sandbox-base.XXXXXX")
  log "debootstrap $suite from $mirror (about a minute)"
  if ! debootstrap_debian "$suite" "$work/rootfs" "$mirror" "$work/debootstrap.log"; then
    rm -rf "$work"; die "debootstrap $suite failed"
  fi
  tar -C "$work/rootfs" --numeric-owner -cf - . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL sandbox.base.key=$key" \
    --change "LABEL org.opencontainers.image.description=\"Sandbox base: debootstrap --variant=minbase $suite + ca-certificates\"" \
    --change 'CMD ["bash"]' - "$tag" >/dev/null
  rm -rf "$work"
  mkdir -p "$IMAGES_CACHE"
  rm -f "$IMAGES_CACHE/debian-$suite-"*.tar.gz
  "$DOCKER" save "$tag" | gzip -1 >"$tarball.tmp" && mv "$tarball.tmp" "$tarball"
  log "built $tag (key $key), cached as $tarball ($(du -h "$tarball" | cut -f1))"
  echo "$key"
}

# The project's Python base (make images-base); prints its key.
ensure_python_base() {
  (cd "$repo" && scripts/images/build-base.sh jobs-local/python-base:bookworm) >&2
  "$DOCKER" image inspect --format '{{ index .Config.Labels "local.base.key" }}' jobs-local/python-base:bookworm
}

declare -A BASE_KEY=()
need_base() {  # debian|python: ensures the base is in the engine, sets BASE_KEY[$1]
  if [[ -z "${BASE_KEY[$1]:-}" ]]; then
    case "$1" in
      debian) BASE_KEY[$1]=$(ensure_debian_base "$DEBIAN_BASE_SUITE") ;;
      python) BASE_KEY[$1]=$(ensure_python_base) ;;
    esac
    [[ -n "${BASE_KEY[$1]}" ]] || die "no key for the $1 base image"
  fi
}

# ---------------------------------------------------------------------------------------------
# Inputs

declare -A TOOL_DIR=()
need_tool() {  # tools module, version: builds it if needed (waits on a running build), sets TOOL_DIR[$1]
  if [[ -z "${TOOL_DIR[$1]:-}" ]]; then
    local mod=${TOOL_MODULE[$1]} want=$2
    grep -qE "^\s*(require\s+)?$mod $want( |\$)" "$repo/k8s/sandbox/tools/$1/go.mod" \
      || die "k8s/sandbox/tools/$1/go.mod does not pin $mod $want: update the tag in $0"
    log "tool $1: k8s/sandbox/tools/build.sh $1 (waits if that build is running)"
    TOOL_DIR[$1]=$("$repo/k8s/sandbox/tools/build.sh" "$1" | tail -n1)
    [[ -f "${TOOL_DIR[$1]}/.complete" ]] || die "tools build of $1 did not complete"
  fi
}

pause_src() {
  local dir
  dir=$(cd "$repo/k8s/sandbox/tools/kubernetes" && go mod download -json "k8s.io/kubernetes@$PAUSE_K8S_VERSION" \
        | sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')
  [[ -f "$dir/build/pause/linux/pause.c" ]] || die "pause.c not found in k8s.io/kubernetes@$PAUSE_K8S_VERSION"
  printf '%s' "$dir/build/pause/linux/pause.c"
}

# Locust's dependency closure from the pip-compile lock file (its "# via" annotations), so the
# image gets locust and exactly what it needs, hash-pinned, without the plotting/test extras.
locust_requirements() {
  python3 - "$repo/loadtest/requirements.txt" <<'PY'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
blocks, parents, order, cur = {}, {}, [], None
for line in open(sys.argv[1]):
    s = line.strip()
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==", line)
    if m:
        cur = norm(m.group(1)); order.append(cur); blocks[cur] = [line]; parents[cur] = set()
    elif cur and s.startswith("--hash="):
        blocks[cur].append(line)
    elif cur and s.startswith("# via"):
        if s[5:].strip():
            parents[cur].add(norm(s[5:].strip()))
    elif cur and s.startswith("#   "):
        parents[cur].add(norm(s[1:].strip()))
need, changed = {"locust"}, True
while changed:
    changed = False
    for p in order:
        if p not in need and parents[p] & need:
            need.add(p); changed = True
sys.stdout.write("# locust's dependency closure, generated by k8s/sandbox/images/build.sh from loadtest/requirements.txt\n")
for p in order:
    if p in need:
        sys.stdout.write("".join(blocks[p]))
PY
}

# Files every scratch image gets: CA bundle (scalers, remote endpoints) and a world-writable /tmp.
stage_scratch_rootfs() {
  local d=$1/rootfs
  mkdir -p "$d/etc/ssl/certs" "$d/tmp"
  chmod 1777 "$d/tmp"
  cp /etc/ssl/certs/ca-certificates.crt "$d/etc/ssl/certs/ca-certificates.crt"
  chmod 0644 "$d/etc/ssl/certs/ca-certificates.crt"
}

# ---------------------------------------------------------------------------------------------
# Registry

registry_digest() {  # name tag -> manifest digest the registry serves, or nothing
  curl -fsS -m 10 -o /dev/null -D - \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$REGISTRY/v2/sandbox/$1/manifests/$2" 2>/dev/null \
    | tr -d '\r' | awk 'tolower($1)=="docker-content-digest:" {print $2}'
}

push() {  # name tag aliases -> records the digest
  local name=$1 tag=$2 aliases=$3 ref digest a
  ref=$(ref_of "$name" "$tag")
  "$DOCKER" push "$ref" >"$work/push-$name.log" 2>&1 || { tail -n 20 "$work/push-$name.log" >&2; die "push $ref failed"; }
  for a in $aliases; do
    "$DOCKER" tag "$ref" "$(ref_of "$name" "$a")"
    "$DOCKER" push "$(ref_of "$name" "$a")" >>"$work/push-$name.log" 2>&1 || die "push $(ref_of "$name" "$a") failed"
  done
  digest=$(registry_digest "$name" "$tag")
  [[ -n "$digest" ]] || die "registry does not serve $ref after the push"
  printf '%s %s\n' "$key" "$digest" >"$state/$REGISTRY_ID-$name-$tag"
}

# ---------------------------------------------------------------------------------------------
# Main

command -v curl >/dev/null || die "curl is needed"
[[ $EUID -eq 0 ]] || log "warning: not root (dockerd, debootstrap and the caches need root)"
DOCKER="$DOCKER" "$repo/scripts/images/dockerd.sh" start
curl -fsS -m 5 -o /dev/null "http://$REGISTRY/v2/" \
  || die "no registry answers on http://$REGISTRY/v2/ (the sandbox bring-up starts one; or run Debian's docker-registry)"
mkdir -p "$IMAGES_CACHE"
# One run at a time (sandbox-up and a developer may both call this): a second run waits, then
# finds the images current.
exec 8>"$IMAGES_CACHE/.build.lock"
flock -n 8 || { log "another build.sh run holds $IMAGES_CACHE/.build.lock; waiting"; flock 8; }
state="$IMAGES_CACHE/pushed"; mkdir -p "$state"
REGISTRY_ID=$(printf '%s' "$REGISTRY" | tr -c 'A-Za-z0-9.\n' '_')
work=$(mktemp -d "${TMPDIR:-/tmp}/sandbox-images.XXXXXX")
trap 'rm -rf "$work"' EXIT

summary=()
total_start=$(date +%s)
for row in "${IMAGES[@]}"; do
  IFS='|' read -r name tag recipe aliases <<<"$row"
  if [[ ${#names[@]} -gt 0 ]] && ! printf '%s\n' "${names[@]}" | grep -qx "$name"; then continue; fi
  start=$(date +%s)
  ref=$(ref_of "$name" "$tag")
  ctx="$work/$name"
  mkdir -p "$ctx"
  buildargs=()
  # Key inputs: the Dockerfile directory, the tag (+aliases), the recipe's own inputs.
  key_parts="$(cd "$here/$name" && find . -type f | LC_ALL=C sort | xargs sha256sum)
$name $tag $aliases $recipe"
  case "$recipe" in
    pause)
      src=$(pause_src)
      key_parts+=$'\n'"$(sha256sum <"$src") $(gcc --version | head -n1)"
      ;;
    tool:*)
      IFS=: read -r _ tmod tbin tfile <<<"$recipe"
      tversion=$tag; [[ "$tmod" == keda ]] && tversion="v$tag"
      need_tool "$tmod" "$tversion"; tdir=${TOOL_DIR[$tmod]}
      [[ -x "$tdir/$tbin" ]] || die "$tdir/$tbin missing"
      # The tools cache dir is keyed by the module's go.mod/go.sum and Go version.
      key_parts+=$'\n'"$tdir/$tbin $(stat -c '%s %Y' "$tdir/$tbin") $(sha256sum </etc/ssl/certs/ca-certificates.crt)"
      ;;
    debian)
      # The Dockerfile checks that Debian's package has the upstream version of the tag.
      vtag=${tag#v}; vtag=${vtag%-management}
      vname=${name^^}; buildargs+=(--build-arg "${vname//-/_}_VERSION=$vtag")
      ;;
    python)
      locust_requirements >"$ctx/requirements.txt"
      grep -q "^locust==$tag " "$ctx/requirements.txt" || die "loadtest/requirements.txt does not pin locust==$tag: update the tag in $0"
      need_base python; key_parts+=$'\n'"base ${BASE_KEY[python]} $(sha256sum <"$ctx/requirements.txt")"
      ;;
  esac
  # Any image on the local Debian base (ARG BASE=sandbox-base/debian:...) depends on its key.
  if grep -q '^ARG BASE=sandbox-base/debian' "$here/$name/Dockerfile"; then
    need_base debian; key_parts+=$'\n'"base ${BASE_KEY[debian]}"
    buildargs+=(--build-arg "BASE=sandbox-base/debian:$DEBIAN_BASE_SUITE")
  fi
  key=$(printf '%s' "$key_parts" | sha256sum | cut -c1-24)
  statefile="$state/$REGISTRY_ID-$name-$tag"

  if [[ -z "$force" && -f "$statefile" ]]; then
    read -r skey sdigest <"$statefile" || true
    if [[ "$skey" == "$key" && "$(registry_digest "$name" "$tag")" == "$sdigest" ]]; then
      summary+=("$(printf '%-28s %-8s %4ss  %s' "$name" "current" "$(( $(date +%s) - start ))" "$ref")")
      continue
    fi
  fi
  local_key=$("$DOCKER" image inspect --format '{{ index .Config.Labels "sandbox.image.key" }}' "$ref" 2>/dev/null || true)
  if [[ -z "$force" && "$local_key" == "$key" ]]; then
    log "$ref: built already, pushing"
    push "$name" "$tag" "$aliases"
    summary+=("$(printf '%-28s %-8s %4ss  %s' "$name" "pushed" "$(( $(date +%s) - start ))" "$ref")")
    continue
  fi

  log "$ref: building"
  cp -a "$here/$name/." "$ctx/"
  case "$recipe" in
    pause)
      gcc -Os -Wall -Werror -static -DVERSION="v3.10.1-sandbox" -o "$ctx/pause" "$src"
      strip "$ctx/pause"
      ;;
    tool:*)
      stage_scratch_rootfs "$ctx"
      cp "$tdir/$tbin" "$ctx/$tfile"
      ;;
  esac
  nocache=(); [[ -n "$force" ]] && nocache=(--no-cache)
  if ! "$DOCKER" build --pull=false "${nocache[@]}" --label "sandbox.image.key=$key" --label "sandbox.image.name=$name" \
        --label "org.opencontainers.image.title=sandbox/$name" \
        --label "org.opencontainers.image.version=$tag" \
        "${buildargs[@]}" -t "$ref" "$ctx" >"$work/build-$name.log" 2>&1; then
    tail -n 40 "$work/build-$name.log" >&2
    die "docker build of $ref failed"
  fi
  push "$name" "$tag" "$aliases"
  rm -rf "$ctx"
  summary+=("$(printf '%-28s %-8s %4ss  %s' "$name" "built" "$(( $(date +%s) - start ))" "$ref")")
done

# Images of ours that no tag points at any more (superseded builds): free their space.
"$DOCKER" image prune -f --filter label=sandbox.image.key >/dev/null 2>&1 || true

log "done in $(( $(date +%s) - total_start ))s (registry $REGISTRY):"
printf '  %s\n' "${summary[@]}" >&2
