"""The default preset's generator (rectified flow, class dropout, Euler) through train and sample on
a real local Ray, with classifier-free guidance on: the process the README's main command uses."""

from __future__ import annotations

import numpy as np
import pytest

from raysynth.artifacts import Layout, read_json
from raysynth.cli import main
from raysynth.data.schema import read_parquet
from raysynth.diffusion.checkpoint import load_generator

pytestmark = pytest.mark.slow

FLOW = ["--preset", "smoke", "--set", "diffusion.process=flow", "--set", "diffusion.class_dropout=0.2",
        "--set", "sampling.sampler=euler", "--set", "sampling.guidance_scale=2", "--set", "cv.folds=2",
        "--set", "diffusion.train_steps=10", "--set", "diffusion.checkpoint_every=10", "-q"]


def test_flow_generator_with_guidance_trains_and_samples(ray_session, tmp_path):
    out = str(tmp_path / "flow")
    for stage in ("prepare", "train", "sample"):
        assert main([stage, "--out", out, *FLOW]) == 0, stage
    L = Layout.at(out)
    model, process, meta = load_generator(L, 0)
    assert process.name == "flow" and model.null_label == int(read_json(L.fingerprint)["num_classes"])
    manifest = read_json(L.synthetic(0) / "manifest.json")
    data = read_parquet([L.synthetic(0) / s for s in manifest["shards"]])
    assert len(data) == manifest["num_samples"] > 0
    assert np.isfinite(data.images).all() and data.images.min() >= -1 and data.images.max() <= 1
    assert set(np.unique(data.labels)) <= set(range(int(read_json(L.fingerprint)["num_classes"])))
