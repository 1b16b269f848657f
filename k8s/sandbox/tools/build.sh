#!/usr/bin/env bash
# Build the sandbox's Go tools from their pinned modules (k8s/sandbox/tools/<name>/go.mod: the one
# place each version is written) into a cache outside the repo, keyed by a hash of each module's
# files, so a second run reuses them.
#   build.sh [NAME...]   (default: every module)   prints the cache dir of each tool on stdout
# Env: SANDBOX_CACHE (default /var/cache/jobs-sandbox)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SANDBOX_CACHE:-/var/cache/jobs-sandbox}
export GOFLAGS="-mod=readonly -buildvcs=false -trimpath"
# Tilt's release (and its starlark-lsp) is served by the module proxy but missing from the checksum
# database: the committed go.sum pins it.
export GONOSUMDB='github.com/tilt-dev/*'
command -v go >/dev/null || { echo "error: Go is not installed (Go >= 1.26 is needed to build the sandbox tools)" >&2; exit 127; }

names=("$@")
[ ${#names[@]} -gt 0 ] || names=($(cd "$here" && ls -d */ | tr -d /))
for name in "${names[@]}"; do
  mod="$here/$name"
  [ -f "$mod/go.mod" ] || { echo "error: no tools module $mod" >&2; exit 2; }
  key=$( (cd "$mod" && find . -type f \( -name 'go.*' -o -name '*.go' -o -name ldflags -o -name '*.html' \) | sort | xargs sha256sum; go env GOVERSION) | sha256sum | cut -c1-16)
  out="$cache/$name-$key"
  mkdir -p "$cache"
  # One build per tool at a time: a second caller waits for the first and reuses its result.
  exec 9>"$out.lock"; flock 9
  if [ ! -f "$out/.complete" ]; then
    start=$(date +%s)
    echo "building $name (cache $out)" >&2
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    # Static binaries, but Tilt's Tiltfile language server links tree-sitter (C).
    cgo=0; [ "$name" = tilt ] && cgo=1
    # A module may stamp versions into its binaries (ldflags file; Kubernetes reports its version from it).
    ldflags="-s -w $(cat "$mod/ldflags" 2>/dev/null || true)"
    modflags=()
    if [ -f "$mod/web/index.html" ]; then
      # Tilt embeds its web UI from pkg/assets/build, which only its release process fills; without
      # it, a release-stamped Tilt refuses to start. Build from a copy of its module with a minimal
      # page there (the module cache itself is read-only).
      # `go mod download` (not `go list -m`): on a cold module cache the source is not there yet.
      src=$(cd "$mod" && go mod download -json github.com/tilt-dev/tilt | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
      [ -d "$src" ] || { echo "error: no source for github.com/tilt-dev/tilt in the module cache" >&2; exit 1; }
      rm -rf "$out.src" && cp -r "$src" "$out.src" && chmod -R u+w "$out.src"
      cp "$mod/web/index.html" "$out.src/pkg/assets/build/index.html"
      cp "$mod/go.mod" "$out.tmp/build.mod" && cp "$mod/go.sum" "$out.tmp/build.sum"
      (cd "$mod" && go mod edit -modfile "$out.tmp/build.mod" -replace "github.com/tilt-dev/tilt=$out.src")
      modflags=(-modfile "$out.tmp/build.mod")
    fi
    (cd "$mod" && CGO_ENABLED=$cgo go build "${modflags[@]}" -ldflags="$ldflags" -o "$out.tmp/" tool) >&2
    rm -rf "$out.src" "$out.tmp/build.mod" "$out.tmp/build.sum"
    touch "$out.tmp/.complete" && rm -rf "$out" && mv "$out.tmp" "$out"
    echo "built $name in $(( $(date +%s) - start ))s" >&2
  fi
  exec 9>&-
  echo "$out"
done
