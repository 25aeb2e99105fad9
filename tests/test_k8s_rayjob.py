"""k8s/rayjob.yaml: a KubeRay RayJob whose structure, versions and entry point match this repository."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def documents() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def ray_version() -> str:
    """The version in pyproject.toml's ``ray[...]==X`` pin."""
    pins = [m.group(1) for d in dependencies() if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\d.]+)", d))]
    assert len(pins) == 1, dependencies()
    return pins[0]


def groups(job: dict) -> list[tuple[str, dict]]:
    spec = job["spec"]["rayClusterSpec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_a_rayjob_with_an_embedded_cluster():
    job = documents()["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec
    assert spec["shutdownAfterJobFinishes"] is True


def test_cpu_head_gpu_workers_from_zero_and_cpu_workers():
    job = documents()["RayJob"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert str(head["rayStartParams"]["num-cpus"]) == "0"  # the head schedules no work
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(head))
    workers = {name: g for name, g in groups(job) if name != "head"}
    gpu = [g for g in workers.values() if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(g))]
    cpu = [g for g in workers.values() if g not in gpu]
    assert len(gpu) == 1 and len(cpu) == 1
    for g in gpu:
        assert g["minReplicas"] == 0 and g["replicas"] == 0 and g["maxReplicas"] >= 1
        for c in containers(g):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
    assert cpu[0]["minReplicas"] == 0
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def test_images_match_the_pinned_ray_version():
    job = documents()["RayJob"]
    version = ray_version()
    assert str(job["spec"]["rayClusterSpec"]["rayVersion"]) == version
    images = [c["image"] for _, g in groups(job) for c in containers(g)]
    assert len(images) == 3
    for image in images:
        repo, tag = image.rsplit(":", 1)
        assert repo == "rayproject/ray" and (tag == version or tag.startswith(version + "-")), image
    gpu_images = [c["image"] for name, g in groups(job) for c in containers(g) if "nvidia.com/gpu" in c["resources"]["limits"]]
    assert all(i.endswith("-gpu") for i in gpu_images)


def test_entrypoint_runs_an_existing_job_script_with_an_object_store_output():
    argv = shlex.split(documents()["RayJob"]["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1].startswith("jobs/")
    assert (ROOT / argv[1]).is_file(), argv[1]
    out = argv[argv.index("--out") + 1]
    assert out.startswith("s3://")
    from raysynth.cli import build_parser

    build_parser().parse_args([Path(argv[1]).stem, *argv[2:]])  # the options exist


def test_runtime_env_has_a_working_dir_and_pyproject_pins():
    env = yaml.safe_load(documents()["RayJob"]["spec"]["runtimeEnvYAML"])
    assert env["working_dir"].endswith(".zip")
    deps = set(dependencies())
    assert set(env["pip"]) <= deps, set(env["pip"]) - deps  # no pin differs from pyproject.toml
    exact = {d for d in deps if "==" in d and not d.startswith("ray")}
    assert exact <= set(env["pip"]), exact - set(env["pip"])  # no exact pin is missing


def test_token_auth_from_a_secret_and_no_public_dashboard():
    docs = documents()
    auth = docs["RayJob"]["spec"]["rayClusterSpec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]
    assert "Service" not in docs and "Ingress" not in docs
    for _, g in groups(docs["RayJob"]):
        for c in containers(g):  # a token written into the manifest would defeat the Secret
            assert all(e.get("name") != "RAY_AUTH_TOKEN" or "valueFrom" in e for e in c.get("env", []))


def test_staging_folder_is_one_shared_volume_on_every_pod():
    docs = documents()
    claim = docs["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    job = docs["RayJob"]
    head = containers(job["spec"]["rayClusterSpec"]["headGroupSpec"])[0]
    staging = next(e["value"] for e in head["env"] if e["name"] == "RAYSYNTH_STAGING")
    for name, g in groups(job):
        pod = g["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in containers(g):
            mounts = [m for m in c["volumeMounts"] if staging.startswith(m["mountPath"].rstrip("/") + "/")]
            assert len(mounts) == 1, name
            volume = volumes[mounts[0]["name"]]
            assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == \
        docs["ServiceAccount"]["metadata"]["name"]
