"""skaffold.yaml: schema (v4beta14) and cross-checks of each profile's effective
configuration (as the real `skaffold diagnose` computes it) against the repo and the
manifests. Composition, rendering and the verify Job: test_real_tools.py."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import ROOT, find, rel, render_dir

CONFIG = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
PROFILES = ("default", "ci", "dev", "prod")


def test_skaffold_schema(schemas_dir):
    schema = json.loads((schemas_dir / "skaffold-v4beta14.json").read_text())
    assert CONFIG["apiVersion"] == "skaffold/v4beta14"
    errors = [f"{e.message} at {list(e.absolute_path)}" for e in jsonschema.Draft7Validator(schema).iter_errors(CONFIG)]
    assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def effective(diagnose):
    return {p: diagnose(None if p == "default" else p)[0] for p in PROFILES}


def dockerfile_targets(path: Path) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", path.read_text(), re.M | re.I))


def test_profiles_present():
    assert {"dev", "ci", "prod", "sandbox"} <= {p["name"] for p in CONFIG["profiles"]}


@pytest.mark.parametrize("profile", PROFILES)
def test_artifacts_build_from_real_dockerfiles(effective, profile):
    cfg = effective[profile]
    arts = cfg["build"]["artifacts"]
    assert {a["image"] for a in arts} == {"main-app", "service-app"}
    assert "gitCommit" in cfg["build"]["tagPolicy"]
    for a in arts:
        dockerfile = ROOT / rel(a.get("context", ".")) / a["docker"]["dockerfile"]
        if not dockerfile.exists():
            pytest.fail(f"{dockerfile} missing")
        targets = dockerfile_targets(dockerfile)
        expected = "dev" if profile == "dev" else "production"
        assert a["docker"]["target"] == expected and expected in targets, (a["image"], targets)


@pytest.mark.parametrize("profile", PROFILES)
def test_kustomize_paths_and_images_used(effective, profile):
    cfg = effective[profile]
    (path,) = cfg["manifests"]["kustomize"]["paths"]
    overlay = rel(path)
    assert overlay == {"dev": "k8s/overlays/dev", "prod": "k8s/overlays/prod"}.get(profile, "k8s/overlays/ci")
    docs = render_dir(ROOT / overlay)
    images = {
        c["image"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    built = {a["image"] for a in cfg["build"]["artifacts"]}
    assert built <= images, f"built but unused: {built - images}"


def test_dev_sync_rules_match_sources_and_image_layout(effective):
    """Every sync rule matches files in the repo and lands where the dev image keeps
    the sources (the Dockerfile's COPY destinations)."""
    for art in effective["dev"]["build"]["artifacts"]:
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


@pytest.mark.parametrize("profile", ("ci", "dev"))
def test_port_forwards_hit_real_service_ports(effective, profile):
    cfg = effective[profile]
    docs = render_dir(ROOT / rel(cfg["manifests"]["kustomize"]["paths"][0]))
    assert cfg["portForward"]
    for pf in cfg["portForward"]:
        svc = find(docs, "Service", pf["resourceName"])
        assert pf["port"] in {p["port"] for p in svc["spec"]["ports"]}
        assert pf["namespace"] == svc["metadata"]["namespace"]


def test_verify_job_manifest_names_the_verify_container(effective):
    (case,) = effective["ci"]["verify"]
    job = yaml.safe_load((ROOT / rel(case["executionMode"]["kubernetesCluster"]["jobManifestPath"])).read_text())
    # Skaffold keeps only the manifest's container named like the verify container
    # (and needs metadata.labels to exist: it adds its run-id there).
    assert case["container"]["name"] in [c["name"] for c in job["spec"]["template"]["spec"]["containers"]]
    assert job["metadata"].get("labels")
    assert case["container"]["image"] in {a["image"] for a in effective["ci"]["build"]["artifacts"]}
