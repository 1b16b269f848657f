"""skaffold.yaml: schema (v4beta14) and cross-checks against the repo and manifests."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT, find, render_dir

CONFIG = yaml.safe_load((ROOT / "skaffold.yaml").read_text())


def test_skaffold_schema(schemas_dir):
    schema = json.loads((schemas_dir / "skaffold-v4beta14.json").read_text())
    assert CONFIG["apiVersion"] == "skaffold/v4beta14"
    errors = [f"{e.message} at {list(e.absolute_path)}" for e in jsonschema.Draft7Validator(schema).iter_errors(CONFIG)]
    assert not errors, "\n".join(errors)


def profiles():
    yield "default", CONFIG
    for p in CONFIG["profiles"]:
        merged = {**CONFIG, **{k: v for k, v in p.items() if k not in ("name", "activation")}}
        yield p["name"], merged


PROFILES = dict(profiles())


def dockerfile_targets(path: Path) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", path.read_text(), re.M | re.I))


def test_profiles_present():
    assert {"dev", "ci", "prod"} <= set(PROFILES)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_artifacts_build_from_real_dockerfiles(profile):
    cfg = PROFILES[profile]
    arts = cfg["build"]["artifacts"]
    assert {a["image"] for a in arts} == {"main-app", "service-app"}
    assert "gitCommit" in cfg["build"]["tagPolicy"]
    for a in arts:
        dockerfile = ROOT / a.get("context", ".") / a["docker"]["dockerfile"]
        if not dockerfile.exists():
            pytest.fail(f"{dockerfile} missing")
        targets = dockerfile_targets(dockerfile)
        expected = "dev" if profile == "dev" else "production"
        assert a["docker"]["target"] == expected and expected in targets, (a["image"], targets)
    # Never push to local clusters; push for prod.
    assert cfg["build"]["local"]["push"] is (profile == "prod")


@pytest.mark.parametrize("profile", list(PROFILES))
def test_kustomize_paths_and_images_used(profile):
    cfg = PROFILES[profile]
    paths = cfg["manifests"]["kustomize"]["paths"]
    overlay = {"dev": "k8s/overlays/dev", "prod": "k8s/overlays/prod"}.get(profile, "k8s/overlays/ci")
    assert paths == [overlay]
    docs = render_dir(ROOT / overlay)
    images = {
        c["image"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    built = {a["image"] for a in cfg["build"]["artifacts"]}
    assert built <= images, f"built but unused: {built - images}"
    for hook in cfg["manifests"].get("hooks", {}).get("before", []):
        cmd = hook["host"]["command"]
        assert (ROOT / cmd[1]).exists() and cmd[2] == overlay


def test_dev_sync_rules_match_sources_and_image_layout():
    """Every sync rule matches files in the repo and lands where the dev image keeps
    the sources (the Dockerfile's COPY destinations)."""
    for art in PROFILES["dev"]["build"]["artifacts"]:
        dockerfile = (ROOT / art["docker"]["dockerfile"]).read_text()
        dev_stage = dockerfile[re.search(r"^FROM\s+\S+\s+AS\s+dev\b", dockerfile, re.M | re.I).start() :]
        copies = dict((src, dst) for src, dst in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s+(\S+)\s*$", dev_stage, re.M))
        files = [
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*.py")
            if ".venv" not in p.parts and ".tools" not in p.parts
        ]
        for rule in art["sync"]["manual"]:
            pattern = rule["src"].replace("**/", "*")
            matched = [f for f in files if fnmatch.fnmatch(f, pattern)]
            assert matched, f"sync rule {rule['src']} matches no file"
            for f in matched:
                dest = rule["dest"].rstrip("/") + "/" + f[len(rule.get("strip", "")) :]
                top = f.split("/")[0] + "/" + f.split("/")[1]  # e.g. main-app/main_app
                assert top in copies, f"{art['image']} dev stage does not COPY {top}"
                assert dest.startswith(copies[top].rstrip("/") + "/"), (f, dest, copies[top])


def test_port_forwards_and_verify():
    docs = render_dir(ROOT / "k8s/overlays/ci")
    for pf in CONFIG["portForward"]:
        svc = find(docs, "Service", pf["resourceName"])
        assert pf["port"] in {p["port"] for p in svc["spec"]["ports"]}
        assert pf["namespace"] == svc["metadata"]["namespace"]
    (case,) = CONFIG["verify"]
    job_path = ROOT / case["executionMode"]["kubernetesCluster"]["jobManifestPath"]
    job = yaml.safe_load(job_path.read_text())
    names = [c["name"] for c in job["spec"]["template"]["spec"]["containers"]]
    # Skaffold keeps the manifest's container with the verify container's name.
    assert case["container"]["name"] in names
    assert case["container"]["image"] in {a["image"] for a in CONFIG["build"]["artifacts"]}
    tokens = find(docs, "Secret", "main-app-api-tokens")  # fixed name mounted by the Job
    vol = job["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"]
    assert vol == tokens["metadata"]["name"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    pol = find(docs, "NetworkPolicy", "api-clients-egress")
    assert all(labels.get(k) == v for k, v in pol["spec"]["podSelector"]["matchLabels"].items())


def test_smoke_job_valid_strict():
    import kubernetes_validate

    job = yaml.safe_load((ROOT / "k8s/verify/smoke-job.yaml").read_text())
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(job, version, strict=True)
