"""Issue 9's performance options: CPU bf16 (digests and samples), lazy imports, and one sampling
pipeline whose actors serve several generators."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from raysynth.config import OPT_IN_FIELDS, Config, apply_override, load_config
from raysynth import artifacts
from raysynth.stages import sample as sample_mod
from raysynth.diffusion.networks import build_denoiser
from raysynth.artifacts import sample_id
from raysynth.diffusion.sampler import ShardSampler
from raysynth.diffusion.trainer import GeneratorFit
from raysynth.artifacts import Layout, write_json

TINY = ["diffusion.channels=[8, 16]", "sampling.steps=3", "sampling.batch_size=4", "sampling.shard_size=4"]


def tiny_cfg(*extra: str) -> Config:
    return load_config("smoke", overrides=[*TINY, *extra])


def legacy_digest(cfg: Config, *sections: str, drop: str) -> str:
    """What ``Config.section_digest`` gave before the field ``section.name`` existed: the hash of
    the sections' plain values, without that field."""
    section, name = drop.split(".")
    plain = {s: getattr(cfg, s).to_dict() for s in sections}
    del plain[section][name]
    for dotted in OPT_IN_FIELDS:  # the fields added after it (objectives, guidance) did not exist either
        sec, field = dotted.split(".")
        if sec in plain:
            plain[sec].pop(field, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def fake_generator(layout: Layout, cfg: Config, fold: int, fraction: float = 1.0, seed: int = 0) -> None:
    """An untrained tiny denoiser saved where ``load_generator`` looks for (fold, fraction)'s generator."""
    torch.manual_seed(seed)
    model = build_denoiser(cfg.diffusion, dims=2, in_channels=1, image_size=cfg.data.image_size, num_classes=2)
    folder = layout.ddpm(fold, fraction)
    model.save_pretrained(folder / artifacts.CHECKPOINT_DIR)
    write_json(folder / "config.json", {"generator_id": f"test-f{fold}-p{fraction}-s{seed}", "fold": fold,
                                        "fraction": fraction, "digest": artifacts.generator_digest(cfg, fraction),
                                        "process": cfg.diffusion.process, "diffusion": cfg.to_dict()["diffusion"],
                                        "num_classes": 2, "num_mask_classes": 0, "spacing": None})


# ---- digests -------------------------------------------------------------------------------------


def test_cpu_bf16_enters_the_sampling_digest_and_sizes_do_not():
    cfg = tiny_cfg()
    base = artifacts.sampling_digest(cfg)
    assert artifacts.sampling_digest(apply_override(cfg, "sampling.cpu_bf16=true")) != base
    assert artifacts.sampling_digest(apply_override(cfg, "sampling.steps=4")) != base
    assert artifacts.sampling_digest(apply_override(cfg, "sampling.num_samples=99")) == base
    assert artifacts.sampling_digest(apply_override(cfg, "sampling.batch_size=7")) == base


def test_cpu_bf16_enters_the_generator_digest(tmp_path):
    cfg = tiny_cfg()
    on = apply_override(cfg, "diffusion.cpu_bf16=true")
    assert artifacts.generator_digest(on) != artifacts.generator_digest(cfg)
    assert artifacts.generator_digest(on, 0.5) != artifacts.generator_digest(cfg, 0.5)
    layout = Layout.at(tmp_path)
    fake_generator(layout, cfg, 0)
    assert artifacts.generator_complete(cfg, layout, 0)
    assert not artifacts.generator_complete(on, layout, 0)  # turning it on retrains the generator


def test_digests_of_runs_without_the_new_flags_are_unchanged():
    """Generators and samples made before cpu_bf16 existed stay up to date while it is off."""
    cfg = tiny_cfg("diffusion.learning_rate=0.001")
    assert artifacts.generator_digest(cfg) == legacy_digest(cfg, "data", "cv", "diffusion", drop="diffusion.cpu_bf16")
    s = cfg.sampling
    kept = Config(sampling=type(s)(sampler=s.sampler, steps=s.steps, seed=s.seed))
    assert artifacts.sampling_digest(cfg) == legacy_digest(kept, "sampling", drop="sampling.cpu_bf16")
    # Other fields still count.
    assert artifacts.generator_digest(apply_override(cfg, "diffusion.learning_rate=0.002")) != artifacts.generator_digest(cfg)


# ---- bf16 sampling and training on CPU -------------------------------------------------------------


def _first_conv_dtypes(sampler: ShardSampler) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    conv = next(m for m in sampler.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_cpu_bf16_sampling_gives_finite_samples_in_range(tmp_path):
    layout = Layout.at(tmp_path)
    fp32_cfg, bf16_cfg = tiny_cfg(), tiny_cfg("sampling.cpu_bf16=true")
    fake_generator(layout, fp32_cfg, 0)
    out = {}
    for name, cfg in (("fp32", fp32_cfg), ("bf16", bf16_cfg)):
        sampler = ShardSampler(cfg.to_dict(), str(layout.root), 0, cpus=1)
        dtypes = _first_conv_dtypes(sampler)
        images, masks = sampler.generate(1, [0, 1, 2, 3, 4])
        assert dtypes and set(dtypes) == {torch.bfloat16 if name == "bf16" else torch.float32}
        assert images.shape == (5, 1, 16, 16) and images.dtype == np.float32 and masks is None
        assert np.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0
        out[name] = images
    diff = np.abs(out["bf16"] - out["fp32"])
    assert 0 < diff.mean() < 0.1  # the same seeds: close, but computed differently


def test_cpu_bf16_training_step_runs_under_autocast():
    cfg = tiny_cfg("diffusion.cpu_bf16=true").diffusion
    fit = GeneratorFit(cfg, dims=2, in_channels=1, image_size=16, num_classes=2)
    assert fit.bf16 and not GeneratorFit(tiny_cfg().diffusion, dims=2, in_channels=1, image_size=16, num_classes=2).bf16
    seen: list[torch.dtype] = []
    conv = next(m for m in fit.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    g = torch.Generator().manual_seed(0)
    x0, labels = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1, torch.tensor([0, 1, 0, 1])
    before = [p.detach().clone() for p in fit.model.parameters()]
    losses = [fit.step(x0, labels, generator=g) for _ in range(2)]
    assert seen and set(seen) == {torch.bfloat16}
    assert all(np.isfinite(losses))
    assert all(p.dtype == torch.float32 for p in fit.model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, fit.model.parameters()))


# ---- one actor, several generators ------------------------------------------------------------------


def test_one_sampler_serves_several_generators_like_dedicated_ones(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    layout = Layout.at(tmp_path)
    keys = [(0, 1.0), (1, 1.0), (0, 0.5), (1, 0.5)]
    for seed, (fold, fraction) in enumerate(keys):
        fake_generator(layout, cfg, fold, fraction, seed=seed)  # different weights: a mix-up would show
    monkeypatch.setattr(ShardSampler, "CACHE", 2)  # fewer slots than generators: evictions happen
    shared = ShardSampler(cfg.to_dict(), str(layout.root), cpus=1)
    batch = {"fold": np.array([k[0] for k in keys] + [0]), "fraction": np.array([k[1] for k in keys] + [1.0]),
             "label": np.array([0, 1, 1, 0, 1]), "lo": np.array([0, 0, 4, 0, 4]), "hi": np.array([4, 2, 6, 3, 5])}
    for fold, fraction in keys:
        layout.synthetic(fold, fraction).mkdir(parents=True)
    rows = shared(batch)
    assert rows["fold"] == [0, 1, 0, 1, 0] and rows["fraction"] == [1.0, 1.0, 0.5, 0.5, 1.0]
    assert len(shared._loaded) == 2  # the cache holds at most CACHE generators
    from raysynth.data.schema import read_parquet

    for i, name in enumerate(rows["shard"]):
        fold, fraction, label = rows["fold"][i], rows["fraction"][i], rows["label"][i]
        lo, hi = int(batch["lo"][i]), int(batch["hi"][i])
        stored = read_parquet([layout.synthetic(fold, fraction) / name])
        assert stored.ids == [sample_id(fold, label, j, fraction) for j in range(lo, hi)]
        own = ShardSampler(cfg.to_dict(), str(layout.root), fold, cpus=1, fraction=fraction)
        images, _ = own.generate(label, list(range(lo, hi)))
        np.testing.assert_array_equal(stored.images, images)
        assert set(stored.extra["generator_id"]) == {own.meta["generator_id"]}


def test_sampler_without_a_fold_needs_fold_columns(tmp_path):
    sampler = ShardSampler(tiny_cfg().to_dict(), str(tmp_path), cpus=1)
    with pytest.raises(ValueError, match="fold"):
        sampler({"label": np.array([0]), "lo": np.array([0]), "hi": np.array([1])})


# ---- lazy imports ---------------------------------------------------------------------------------


def test_a_2d_sampler_does_not_import_monai_or_the_preprocessing_stack(tmp_path):
    layout = Layout.at(tmp_path)
    fake_generator(layout, tiny_cfg(), 0)
    code = f"""
import json, sys
from raysynth.diffusion.checkpoint import load_generator
from raysynth.diffusion.sampler import ShardSampler
from raysynth.artifacts import Layout
load_generator(Layout.at({str(layout.root)!r}), 0)
print(json.dumps([m for m in ("monai", "raysynth.stages.prepare", "sklearn", "nibabel") if m in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_3d_denoiser_still_builds_checkpoints_and_pickles():
    import copy
    import pickle

    from raysynth.diffusion import networks

    model = networks.Denoiser(3, 1, 8, 2, channels=[8, 16], gradient_checkpointing=True)
    blocks = [m for m in model.modules() if type(m).__name__ == "_CheckpointedResnetBlock"]
    assert blocks and all(type(b) is networks._CheckpointedResnetBlock for b in blocks)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert sum(type(m) is networks._CheckpointedResnetBlock for m in clone.modules()) == len(blocks)
    with pytest.raises(AttributeError):
        networks.not_a_name  # noqa: B018


# ---- the Ray Data pipeline: every generator in one run ---------------------------------------------


@pytest.mark.slow
def test_one_pipeline_writes_every_generators_shards(ray_session, tmp_path):
    cfg = tiny_cfg("sampling.max_actors=1")
    layout = Layout.at(tmp_path)
    keys = [(0, 1.0), (1, 1.0), (0, 0.25)]
    requests = []
    for seed, (fold, fraction) in enumerate(keys):
        fake_generator(layout, cfg, fold, fraction, seed=seed)
        requests += [{**r, "fold": fold, "fraction": fraction}
                     for r in sample_mod.plan_requests({0: 5, 1: 3}, {}, cfg.sampling.shard_size)]
    sample_mod._run_requests(cfg, layout, requests)
    from raysynth.data.schema import read_parquet

    for fold, fraction in keys:
        folder = layout.synthetic(fold, fraction)
        assert sorted(p.name for p in folder.glob("part-*.parquet")) == sorted(
            artifacts.shard_name(r["label"], r["lo"], r["hi"]) for r in requests if (r["fold"], r["fraction"]) == (fold, fraction))
        own = ShardSampler(cfg.to_dict(), str(layout.root), fold, cpus=1, fraction=fraction)
        stored = read_parquet([folder / artifacts.shard_name(1, 0, 3)])
        np.testing.assert_array_equal(stored.images, own.generate(1, [0, 1, 2])[0])


# ---- OpenMP spinning -------------------------------------------------------------------------------


def test_openmp_env_leaves_a_chosen_policy_alone(monkeypatch):
    from raysynth.runtime import OPENMP_ENV, openmp_env

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    assert openmp_env() == OPENMP_ENV == {"GOMP_SPINCOUNT": "1000"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert openmp_env() == {}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "50")
    assert openmp_env() == {}


@pytest.mark.slow
def test_workers_of_a_local_ray_start_with_the_openmp_env():
    """In a fresh process (the test session's Ray is already up): ensure_ray starts a local Ray
    whose workers have the variable in their environment from the start, when libgomp reads it."""
    code = """
import json, os
for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
    os.environ.pop(name, None)
import ray
from raysynth.config import load_config
from raysynth.runtime import ensure_ray
ensure_ray(load_config("smoke", overrides=["ray.num_cpus=1"]))
seen = ray.get(ray.remote(num_cpus=1)(lambda: os.environ.get("GOMP_SPINCOUNT")).remote())
ray.shutdown()
print(json.dumps(seen))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == "1000"
