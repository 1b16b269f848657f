"""Policy of the GitHub Actions files: pinning, permissions, concurrency, timeouts, secrets, what runs where."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from ciparse import ROOT, WORKFLOWS_DIR, load_yaml, make_invocations, make_targets, triggers, workflow_paths
from lint_skips import SkipListError, load_skips

USES_RE = re.compile(r"^\s*(?:-\s*)?uses:\s*(?P<ref>[^\s#]+)\s*(?:#\s*(?P<comment>.*))?$", re.MULTILINE)
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
VERSION_COMMENT_RE = re.compile(r"^v\d+\.\d+\.\d+$")
ALLOWED_SECRETS = {"DOCKERHUB_USERNAME", "DOCKERHUB_TOKEN"}


def _uses() -> list[tuple[str, str, str | None]]:
    found = []
    for path in workflow_paths():
        for match in USES_RE.finditer(path.read_text(encoding="utf-8")):
            found.append((path.name, match["ref"], (match["comment"] or "").strip() or None))
    return found


def _jobs(workflows):
    for name, workflow in workflows.items():
        for job_id, job in workflow["jobs"].items():
            yield name, job_id, job


def _make_goals(workflow: dict) -> set[str]:
    goals = set()
    for job in workflow["jobs"].values():
        for step in job.get("steps") or []:
            for args in make_invocations(step.get("run", "")):
                goals.update(make_targets(args))
    return goals


def test_the_three_workflows_exist(workflows):
    assert {"ci.yml", "images.yml", "e2e.yml"} <= set(workflows)


def test_every_action_is_pinned_by_full_sha_with_version_comment():
    uses = _uses()
    assert uses
    problems = []
    for workflow, ref, comment in uses:
        if ref.startswith("./"):
            continue
        assert not ref.startswith("docker://") or "@sha256:" in ref, f"{workflow}: {ref} not pinned by digest"
        action, _, version = ref.partition("@")
        if not SHA_RE.match(version):
            problems.append(f"{workflow}: {ref} is not pinned by a full commit SHA")
        elif not comment or not VERSION_COMMENT_RE.match(comment):
            problems.append(f"{workflow}: {action}@{version[:7]} needs a `# vX.Y.Z` comment, got {comment!r}")
    assert not problems, "\n".join(problems)


def test_an_action_has_one_pin_across_workflows():
    pins: dict[str, set[str]] = {}
    for _, ref, comment in _uses():
        action, _, version = ref.partition("@")
        pins.setdefault(action, set()).add(f"{version} # {comment}")
    assert {a: p for a, p in pins.items() if len(p) > 1} == {}


def test_every_job_has_a_timeout(workflows):
    for name, job_id, job in _jobs(workflows):
        timeout = job.get("timeout-minutes")
        assert isinstance(timeout, int) and 0 < timeout <= 90, f"{name}:{job_id}: timeout-minutes {timeout!r}"


def test_permissions_are_read_only(workflows):
    for name, workflow in workflows.items():
        assert workflow.get("permissions") == {"contents": "read"}, f"{name}: top-level permissions"
    for name, job_id, job in _jobs(workflows):
        permissions = job.get("permissions", {})
        assert isinstance(permissions, dict), f"{name}:{job_id}: permissions {permissions!r}"
        assert "write" not in permissions.values(), f"{name}:{job_id}: writes {permissions}"


def test_superseded_runs_are_cancelled(workflows):
    for name, workflow in workflows.items():
        concurrency = workflow.get("concurrency") or {}
        assert "github.ref" in str(concurrency.get("group")), f"{name}: concurrency group per ref"
        # A push's image build always finishes: latest only moves forward, its sha- tag exists.
        cancels = "${{ github.event_name == 'pull_request' }}" if name == "images.yml" else True
        assert concurrency.get("cancel-in-progress") == cancels, f"{name}: cancel-in-progress"


def test_checkout_does_not_persist_credentials(workflows):
    for name, job_id, job in _jobs(workflows):
        for step in job.get("steps") or []:
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert (step.get("with") or {}).get("persist-credentials") is False, f"{name}:{job_id}"


def test_only_the_docker_hub_secrets_and_only_in_images(workflows):
    for path in workflow_paths():
        text = path.read_text(encoding="utf-8")
        used = set(re.findall(r"secrets\.([A-Za-z0-9_]+)", text))
        assert "secrets: inherit" not in text
        if path.name == "images.yml":
            assert used == ALLOWED_SECRETS, f"{path.name}: {sorted(used)}"
        else:
            assert not used, f"{path.name} must not use secrets: {sorted(used)}"


def test_ci_runs_lint_tests_k8s_proof_image_chaos_and_observability_tests(workflows):
    ci = workflows["ci.yml"]
    assert {"pull_request", "push"} <= set(triggers(ci))
    assert {"lint", "test", "run", "test-k8s", "test-images", "test-chaos", "test-observability"} <= _make_goals(ci)


def test_ci_caches_pip_and_uploads_reports(workflows):
    for job_id, job in workflows["ci.yml"]["jobs"].items():
        steps = job["steps"]
        setup = [s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python@")]
        assert setup and setup[0]["with"].get("cache") == "pip", f"ci.yml:{job_id}: pip cache"
        uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
        assert uploads and "reports/" in str(uploads[0]["with"]["path"]), f"ci.yml:{job_id}: upload reports/"
        assert uploads[0].get("if") == "${{ !cancelled() }}", f"ci.yml:{job_id}: upload on failure too"


def test_images_build_multi_arch_with_attestations_and_push_only_outside_pull_requests(workflows):
    images = workflows["images.yml"]
    on = triggers(images)
    assert "pull_request" in on and on["push"]["branches"] == ["main"] and on["push"]["tags"]
    (job,) = images["jobs"].values()
    assert {entry["dockerfile"] for entry in job["strategy"]["matrix"]["include"]} == {
        "main-app/Dockerfile",
        "service-app/Dockerfile",
    }
    assert job["env"]["PUSH"] == "${{ github.event_name != 'pull_request' }}"
    steps = {str(s.get("uses", "")).split("@")[0]: s for s in job["steps"]}
    assert steps["docker/login-action"]["if"] == "${{ env.PUSH == 'true' }}"
    build = steps["docker/build-push-action"]["with"]
    assert build["context"] == "."
    assert build["platforms"] == "linux/amd64,linux/arm64"
    assert build["push"] == "${{ env.PUSH == 'true' }}"
    assert build["sbom"] is True and build["provenance"] == "mode=max"
    assert "type=registry" in build["cache-to"]
    # The cache is read from the project's own namespace only, never from the placeholder one
    # a fork's pull request (no secrets, no variables) would get.
    assert build["cache-from"] == "${{ env.CACHE_FROM }}"
    cache_from = job["env"]["CACHE_FROM"]
    assert "type=registry" in cache_from and "example" not in cache_from
    assert cache_from.startswith("${{ (vars.DOCKERHUB_NAMESPACE || secrets.DOCKERHUB_USERNAME) && ")
    tags = steps["docker/metadata-action"]["with"]["tags"]
    for tag in ("type=sha", "type=semver,pattern={{version}}", "type=raw,value=latest,enable={{is_default_branch}}"):
        assert tag in tags
    assert "latest=false" in steps["docker/metadata-action"]["with"]["flavor"]


def test_e2e_runs_cluster_deploy_smoke_and_locust_and_collects_logs(workflows):
    e2e = workflows["e2e.yml"]
    assert {"cluster-up", "deploy", "loadtest", "cluster-down"} <= _make_goals(e2e)
    steps = e2e["jobs"]["e2e"]["steps"]
    scripts = "\n".join(s.get("run", "") for s in steps)
    assert "PROFILE=ci" in scripts and "rollout status" in scripts
    assert "scaledobjects" in scripts and "hpa" in scripts
    assert any(s.get("if") == "${{ failure() }}" and "logs" in s.get("run", "") for s in steps)
    assert steps[-1].get("if") == "${{ always() }}" and "make cluster-down" in steps[-1]["run"]


def test_dependabot_covers_pip_docker_and_actions():
    config = load_yaml(ROOT / ".github" / "dependabot.yml")
    ecosystems = {}
    for update in config["updates"]:
        dirs = update.get("directories") or [update["directory"]]
        ecosystems.setdefault(update["package-ecosystem"], []).extend(dirs)
    assert {"pip", "docker", "github-actions"} <= set(ecosystems)
    for ecosystem, dirs in ecosystems.items():
        for directory in dirs:
            assert (ROOT / directory.lstrip("/")).is_dir(), f"dependabot {ecosystem}: {directory} does not exist"
    for directory in ecosystems["docker"]:
        assert (ROOT / directory.lstrip("/") / "Dockerfile").is_file()
    # Every directory with a pinned requirements file, and every Dockerfile, gets updates.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    locks = re.compile(r"(^|/)requirements[^/]*\.txt$|^requirements/")
    pip_dirs = {"/" + str(Path(f).parent) for f in tracked if locks.search(f)}
    docker_dirs = {
        "/" + str(Path(f).parent) for f in tracked if Path(f).name == "Dockerfile" and _pulls_a_registry_image(ROOT / f)
    }
    assert not pip_dirs - set(ecosystems["pip"]), "pinned requirements that Dependabot does not update"
    assert not docker_dirs - set(ecosystems["docker"]), "Dockerfiles that Dependabot does not update"


# Base images this repository builds on the machine itself (scripts/images/build-base.sh,
# k8s/sandbox/images/): nothing on a registry for Dependabot to update.
LOCALLY_BUILT_IMAGES = ("jobs-local/", "sandbox-base/")


def _pulls_a_registry_image(dockerfile: Path) -> bool:
    text = dockerfile.read_text(encoding="utf-8")
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))
    for image in re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", text, re.M | re.I):
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), ""), image)
        if image and image != "scratch" and image not in stages and not image.startswith(LOCALLY_BUILT_IMAGES):
            return True
    return False


def test_registry_image_detection():
    assert _pulls_a_registry_image(ROOT / "main-app" / "Dockerfile")


def test_checkov_skips_all_have_reasons():
    load_skips(ROOT / ".github" / "lint-skips.yaml", "checkov")


def test_a_skip_without_reason_is_refused(tmp_path):
    skips = tmp_path / "skips.yaml"
    skips.write_text("checkov:\n  - id: CKV_GHA_1\n", encoding="utf-8")
    with pytest.raises(SkipListError, match="no reason"):
        load_skips(skips, "checkov")
    skips.write_text("checkov:\n  - id: CKV_GHA_1\n    reason: because\n", encoding="utf-8")
    assert [e["id"] for e in load_skips(skips, "checkov")] == ["CKV_GHA_1"]


def test_docs_explain_triggers_secrets_and_namespace():
    doc = (ROOT / "docs" / "ci-cd.md").read_text(encoding="utf-8")
    for needle in ("DOCKERHUB_USERNAME", "DOCKERHUB_TOKEN", "DOCKERHUB_NAMESPACE", *(p.name for p in workflow_paths())):
        assert needle in doc, f"docs/ci-cd.md does not mention {needle}"
    assert WORKFLOWS_DIR.is_dir()


def _glob_re(pattern: str) -> re.Pattern:
    """GitHub's path-filter globs: `**` crosses directories, `*` and `?` do not."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def _kustomize_inputs(directory: Path, seen: set[Path]) -> set[Path]:
    """Every file a kustomization reads, following resources/components into other dirs."""
    directory = directory.resolve()
    if directory in seen:
        return set()
    seen.add(directory)
    kfile = directory / "kustomization.yaml"
    files = {kfile}
    doc = load_yaml(kfile)
    refs = list(doc.get("resources", [])) + list(doc.get("components", []))
    refs += [p["path"] for p in doc.get("patches", []) if "path" in p]
    for gen in doc.get("configMapGenerator", []) + doc.get("secretGenerator", []):
        refs += [f.split("=", 1)[-1] for f in gen.get("files", [])] + list(gen.get("envs", []))
    for ref in refs:
        target = (directory / ref).resolve()
        if target.is_dir():
            files |= _kustomize_inputs(target, seen)
        elif "secrets/" not in ref:  # generated, git-ignored credentials
            files.add(target)
    return files


def _e2e_inputs() -> set[str]:
    """Repository files the e2e job's build and deploy read (`make cluster-up`,
    `make deploy PROFILE=ci`, `make loadtest`)."""
    skaffold = load_yaml(ROOT / "skaffold.yaml")
    files = {ROOT / p for p in ("skaffold.yaml", "Makefile", ".dockerignore", ".github/workflows/e2e.yml")}
    files |= set((ROOT / "mk").glob("*.mk"))
    # Build context (the repo root) as .dockerignore lets it through, and the Dockerfiles.
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        if line.startswith("!"):
            allowed = ROOT / line[1:].rstrip("/")
            files |= {p for p in allowed.rglob("*") if p.is_file()} | {allowed}
    files |= {ROOT / a["docker"]["dockerfile"] for a in skaffold["build"]["artifacts"]}
    # Manifests: the kustomize tree of every path Skaffold renders for ci, hooks, verify.
    for path in skaffold["manifests"]["kustomize"]["paths"]:
        files |= _kustomize_inputs(ROOT / path, set())
    for hook in skaffold["manifests"].get("hooks", {}).get("before", []):
        files |= {ROOT / arg for arg in hook["host"]["command"] if (ROOT / arg).is_file()}
    for case in skaffold.get("verify", []):
        files.add(ROOT / case["executionMode"]["kubernetesCluster"]["jobManifestPath"])
    # gen-secrets.py (make k8s-secrets) loads the contract's access/topology modules.
    files |= set((ROOT / "contract" / "jobs_contract").glob("*.py"))
    files |= {ROOT / "k8s/kind/cluster.yaml", ROOT / "loadtest/locustfile.py", ROOT / "loadtest/requirements.txt"}
    # The Tiltfile deploys the same manifests and images; e2e is their only cluster run.
    files.add(ROOT / "Tiltfile")
    return {p.resolve().relative_to(ROOT).as_posix() for p in files if p.is_file()}


def test_e2e_path_filter_covers_every_file_its_build_and_deploy_read(workflows):
    filters = triggers(workflows["e2e.yml"])["pull_request"]["paths"]
    patterns = [_glob_re(p) for p in filters]
    inputs = _e2e_inputs()
    assert {"rabbitmq/rabbitmq.conf", "scripts/images/requirements-build.txt", ".dockerignore"} <= inputs
    missed = sorted(f for f in inputs if not any(p.match(f) for p in patterns))
    assert not missed, f"e2e.yml does not run when these change: {missed}"


def test_path_filter_globs_behave_like_github():
    assert _glob_re("k8s/**").match("k8s/overlays/ci/kustomization.yaml")
    assert not _glob_re("mk/*").match("mk/sub/x.mk") and _glob_re("mk/*").match("mk/k8s.mk")
    assert not _glob_re("Tiltfile").match("Tiltfile.bak")
