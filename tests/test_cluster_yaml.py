"""cluster.yaml is valid for Ray's own autoscaler schema, and keeps the cluster closed."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_rays_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load()))


def test_token_auth_and_no_public_dashboard():
    cfg = load()
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all(c.startswith("RAY_AUTH_MODE=token ") for c in ray_starts)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for perm in cfg["provider"]["security_group"]["IpPermissions"]:
        assert perm["FromPort"] == perm["ToPort"] == 22
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in perm["IpRanges"])


def test_schema_check_can_fail():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load()
    cfg["available_node_types"]["gpu_worker"]["min_wrokers"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(cfg))


def test_gpu_workers_scale_from_zero_and_setup_installs_the_package():
    cfg = load()
    assert cfg["available_node_types"]["gpu_worker"]["min_workers"] == 0
    assert any("pip install" in c and "raysynth" in c for c in cfg["setup_commands"])


def test_staging_folder_for_uri_outputs_is_on_the_shared_efs_mount():
    cfg = load()
    mounts = [c for c in cfg["initialization_commands"] if "mount -t efs" in c]
    assert len(mounts) == 1
    efs = mounts[0].split("||")[0].split()[-1]  # the mount point
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    for cmd in starts:
        staging = [w.split("=", 1)[1] for w in cmd.split() if w.startswith("RAYSYNTH_STAGING=")]
        assert len(staging) == 1 and staging[0].startswith(efs.rstrip("/") + "/"), cmd
