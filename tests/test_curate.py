"""Curation (``sampling.curate``): a network trained on the fold's real training part keeps the
synthetic samples it agrees with; never a test image; the study draws from the kept ones only."""

from __future__ import annotations

import numpy as np
import pytest

from raysynth.artifacts import CURATION, Layout, read_json, read_prepared, read_subsets, read_synthetic
from raysynth.cli import main
from raysynth.config import ConfigError, load_config
from raysynth.data.schema import ImageSet
from raysynth.design import class_counts, first_per_class, largest_ratio
from raysynth.downstream.curate import curate, mask_agreement
from raysynth.downstream.trial import trial_data


def _bright_dark(n: int, labels: np.ndarray, seed: int, prefix: str) -> ImageSet:
    """Class 1 images are bright, class 0 dark: a task a small CNN learns in a few epochs."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.1, (n, 1, 16, 16)).astype(np.float32) + np.where(labels == 1, 0.6, -0.6)[:, None, None, None]
    ids = [f"{prefix}-c{int(c)}-{i:07d}" for i, c in enumerate(labels)]
    return ImageSet(ids, ids, labels.astype(np.int64), np.clip(images, -1, 1).astype(np.float32), None)


def test_masks_that_agree_score_one_and_disjoint_ones_zero():
    a = np.zeros((4, 8, 8), np.uint8)
    b = a.copy()
    a[1, :4], b[1, :4] = 1, 1  # identical lesions
    a[2, :4], b[2, 4:] = 1, 1  # disjoint lesions
    a[3, :4], b[3, :2] = 1, 1  # the generated lesion is half the curator's: Dice 2*16/(32+16)
    assert mask_agreement(a, b, 2).tolist() == pytest.approx([1.0, 1.0, 0.0, 2 / 3])


def test_a_curator_trained_on_real_data_drops_mislabelled_samples():
    real = _bright_dark(48, np.arange(48) % 2, 0, "real")
    labels = np.arange(40) % 2
    synthetic = _bright_dark(40, labels, 1, "syn")
    flipped = np.arange(40) < 10  # these carry the other class's picture
    synthetic.images[flipped] = _bright_dark(10, 1 - labels[:10], 2, "x").images
    record = curate("classification", real, synthetic, threshold=0.5, num_classes=2, num_mask_classes=None, epochs=8,
                    batch_size=16, learning_rate=3e-3, width=8, seed=0)
    dropped = set(record["dropped"])
    assert dropped == {sid for sid, f in zip(synthetic.ids, flipped) if f}
    assert record["num_kept"] == 30 and sum(v["kept"] for v in record["per_class"].values()) == 30
    assert record["trained_on"] == real.ids and record["threshold"] == 0.5
    assert all(record["scores"][sid] < 0.5 for sid in dropped)


def test_a_curated_pool_gives_the_first_kept_samples_of_each_class():
    labels = np.array([0] * 6 + [1] * 6)
    pool = _bright_dark(12, labels, 0, "s")
    pool = pool.select([i for i in range(12) if i not in (1, 7, 8)])  # curation dropped 0/1, 1/1 and 1/2
    got = first_per_class(pool, {0: 3, 1: 3}, curated=True)
    assert got.ids == ["s-c0-0000000", "s-c0-0000002", "s-c0-0000003", "s-c1-0000006", "s-c1-0000009",
                       "s-c1-0000010"]
    assert len(first_per_class(pool, {0: 9, 1: 9}, curated=True)) == 9  # short of kept samples: all there are


def test_curate_config():
    cfg = load_config("smoke", None, ["sampling.curate.threshold=0.8"])
    assert cfg.sampling.curate.threshold == 0.8 and cfg.sampling.curate.oversample == 2.0
    assert load_config("smoke").sampling.curate is None
    with pytest.raises(ConfigError, match="sampling.curate.oversample"):
        load_config("smoke", None, ["sampling.curate.oversample=0.5"])


@pytest.mark.slow
def test_curation_in_the_sample_stage_never_sees_a_test_image(ray_session, tmp_path):
    out = str(tmp_path / "run")
    args = ["--preset", "smoke", "--out", out, "--set", "diffusion.train_steps=10", "--set",
            "diffusion.checkpoint_every=10", "--set", "sampling.curate.threshold=0.4", "--set", "study.epochs=2", "-q"]
    for stage in ("prepare", "train", "sample"):
        assert main([stage, *args]) == 0, stage
    cfg = load_config("smoke", None, [a for a in args[4:] if a != "-q" and a != "--set"])
    layout = Layout.at(out)
    _, _, splits = read_prepared(layout, cfg)
    subsets = read_subsets(layout, cfg)
    for split in splits:
        k = split["fold"]
        record = read_json(layout.synthetic(k) / CURATION)
        manifest = read_json(layout.synthetic(k) / "manifest.json")
        assert sorted(record["trained_on"]) == sorted(subsets[k][1.0]) and not set(record["trained_on"]) & set(split["test"])
        assert manifest["curation"]["num_kept"] == record["num_kept"] == record["num_scored"] - len(record["dropped"])
        assert record["num_scored"] == manifest["num_samples"]
        kept = read_synthetic(layout, k, cfg=cfg)
        assert not set(kept.ids if kept else []) & set(record["dropped"])
        assert len(read_synthetic(layout, k)) == manifest["num_samples"]  # without the config: the whole set
    # sampled at twice the largest ratio (oversample 2); a synthetic arm draws from the kept samples only
    records, fingerprint, _ = read_prepared(layout, cfg)
    labels = dict(zip(records.ids, records.labels.tolist()))
    real_counts = {c: sum(labels[i] == c for i in subsets[0][1.0]) for c in range(int(fingerprint["num_classes"]))}
    assert read_json(layout.synthetic(0) / "manifest.json")["num_samples"] == \
        sum(class_counts(cfg, real_counts, None, ratio=2 * largest_ratio(cfg)).values())
    record = read_json(layout.synthetic(0) / CURATION)
    trial = {"arm": "synthetic", "ratio": max(cfg.study.ratios_for(cfg.sampling.ratio)), "fraction": 1.0, "fold": 0,
             "seed": 0}
    if record["num_kept"]:
        train, _, n_real, n_synthetic, _ = trial_data(cfg, layout, trial, set())
        assert 0 < n_synthetic <= record["num_kept"] and not set(train.ids) & set(record["dropped"])
    # the sample stage again: nothing to redo
    assert main(["sample", *args]) == 0 and read_json(layout.synthetic(0) / CURATION)["digest"] == record["digest"]
