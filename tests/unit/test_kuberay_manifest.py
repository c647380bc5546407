"""deploy/kuberay/rayjob-generate.yaml: a RayJob that KubeRay accepts (the fields its v1 CRD
requires: ray-operator/config/crd/bases/ray.io_rayjobs.yaml), whose entrypoint is a command line
this project's generation job accepts, with one engine per GPU worker and the S3 credentials
from a Secret, never in the manifest."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kuberay" / "rayjob-generate.yaml"


def load() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def test_it_is_a_rayjob_with_what_the_crd_requires():
    job = load()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    # The CRD requires a head template with containers, and groupName and template per worker group.
    assert isinstance(head["rayStartParams"], dict) and all(isinstance(v, str) for v in head["rayStartParams"].values())
    assert containers(head["template"])[0]["image"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["groupName"] and gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert containers(gpu["template"])[0]["image"] and isinstance(gpu["rayStartParams"], dict)


def test_one_engine_per_gpu_worker_and_a_cache_per_node():
    spec = load()["spec"]
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    worker = containers(gpu["template"])[0]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    args = shlex.split(spec["entrypoint"])
    settings = dict(a.split("=", 1) for a in args[3:])
    assert int(settings["workers"]) == gpu["replicas"] * gpus
    assert settings["ray.address"] == "auto"
    for container in (worker, containers(spec["rayClusterSpec"]["headGroupSpec"]["template"])[0]):
        env = {e["name"]: e["value"] for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert env["PIPELINE_CACHE"] == mounts["node-cache"] and env["HF_HOME"].startswith(mounts["node-cache"])
        # Credentials come from a Secret; nothing secret-looking is written in the manifest.
        assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["llama-batch-s3"]
        assert not any(k.startswith("AWS_") for k in env)
    volumes = {v["name"]: v for v in gpu["template"]["spec"]["volumes"]}
    assert "hostPath" in volumes["node-cache"]  # a node's copies outlive its pods


def test_the_entrypoint_is_a_command_line_the_job_accepts():
    args = shlex.split(load()["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "jobs.generate"]
    cfg = compose("generate", args[3:])  # Hydra refuses unknown settings
    assert cfg.input.startswith("s3://") and cfg.output.path.startswith("s3://") and cfg.lora_root.startswith("s3://")
