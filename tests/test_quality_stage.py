"""The quality stage end to end on tiny fabricated artifacts (16x16 images, two folds, two classes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from raysynth.config import load_config
from raysynth.data.schema import SYNTHETIC_SCHEMA, ImageSet, checksum, read_parquet, write_parquet
from raysynth.errors import PrivacyGateError, StageError
from raysynth.artifacts import Layout, read_json, write_json
from raysynth.artifacts import generator_digest, prepared_digest, quality_digest, sampling_digest
from raysynth.stages import quality as stage
from raysynth.pipeline import enforce_privacy_gate as raise_if_failed
from raysynth.stages.quality import COMPARISONS, assess_quality

SIZE, PER_CLASS = 16, 10
CLASSES = ["healthy", "lesion"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core box they oversubscribe it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n: int, label: int, rng: np.random.Generator, dims: int = 2) -> np.ndarray:
    """Smooth random fields; class 1 carries a bright disc, as a lesion would."""
    x = gaussian_filter(rng.normal(size=(n,) + (SIZE,) * dims), sigma=(0,) + (1.5,) * dims)
    x = 0.6 * np.tanh(x / x.std())
    if label:
        grid = np.indices((SIZE,) * dims) - SIZE / 2 + 0.5
        x = np.where((grid**2).sum(0) < 16, 0.9, x)
    return x.astype(np.float32)[:, None]  # (n, 1, *S)


def _synthetic(fold: int, images: np.ndarray, labels: np.ndarray) -> ImageSet:
    n = len(images)
    return ImageSet(
        ids=[f"syn-f{fold}-{i:04d}" for i in range(n)], subjects=["synthetic"] * n, labels=labels, images=images,
        extra={"fold": [fold] * n, "generator_id": [f"ddpm-fold{fold}"] * n, "seed": list(range(n)),
               "sampler": ["ddim"] * n, "steps": [5] * n, "checksum": [checksum(im) for im in images],
               "path": [None] * n})


def _stamp(layout: Layout, cfg) -> None:
    """What train and sample write beside their outputs, and what marks them current for ``cfg``:
    the fingerprint's digest, each generator's config.json, each synthetic set's manifest."""
    fingerprint = read_json(layout.fingerprint)
    write_json(layout.fingerprint, {**fingerprint, "config_digest": prepared_digest(cfg)})
    for split in read_json(layout.splits)["folds"]:
        k = split["fold"]
        write_json(layout.ddpm(k) / "config.json", {"generator_id": f"ddpm-fold{k}", "digest": generator_digest(cfg)})
        if not (layout.ddpm(k) / "train_ids.json").is_file():
            write_json(layout.ddpm(k) / "train_ids.json", {"train_ids": split["train"]})
        shards = sorted(p.name for p in layout.synthetic(k).glob("part-*.parquet"))
        samples = [{"id": i} for name in shards for i in read_parquet([layout.synthetic(k) / name]).ids]
        write_json(layout.synthetic(k) / "manifest.json", {"generator_id": f"ddpm-fold{k}", "sampling_digest":
                   sampling_digest(cfg), "shards": shards, "samples": samples})


def _make_artifacts(root):
    """prepared/ (data, fingerprint, splits), ddpm/fold_0/train_ids.json, honest synthetic for both folds."""
    rng = np.random.default_rng(0)
    layout = Layout.at(root)
    images = np.concatenate([_images(PER_CLASS, c, rng) for c in range(2)])
    labels = np.repeat(np.arange(2), PER_CLASS)
    ids = [f"s{i:03d}" for i in range(len(labels))]
    write_parquet(ImageSet(ids=ids, subjects=ids, labels=labels, images=images), layout.data_parquet)
    write_json(layout.fingerprint, {"class_names": CLASSES, "dims": 2, "task": "classification"})
    folds = [{"fold": k, "test": [i for j, i in enumerate(ids) if j % 2 == k],
              "train": [i for j, i in enumerate(ids) if j % 2 != k]} for k in range(2)]
    write_json(layout.splits, {"folds": folds})
    # Fold 0's generator saw a subset of its training part; fold 1's all of it.
    write_json(layout.ddpm(0) / "train_ids.json", {"train_ids": folds[0]["train"][:-1]})
    for k in range(2):
        syn_labels = np.repeat(np.arange(2), 6)
        syn = np.concatenate([_images(6, c, rng) for c in range(2)])
        write_parquet(_synthetic(k, syn, syn_labels), layout.synthetic(k) / "part-0.parquet", SYNTHETIC_SCHEMA)
    _stamp(layout, _cfg())
    return layout, images, labels, ids, folds


@pytest.fixture()
def artifacts(tmp_path):
    return _make_artifacts(tmp_path)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """One assessed run shared by the read-only tests (each run costs seconds on 2 cores)."""
    layout = _make_artifacts(tmp_path_factory.mktemp("honest"))[0]
    return layout, assess_quality(_cfg(), layout)


def _cfg(*overrides: str):
    return load_config("smoke", overrides=["quality.encoder_epochs=2", "quality.feature_dim=8", *overrides])


def test_honest_generator_passes_and_quality_json_is_complete(honest):
    layout, summary = honest
    cfg = _cfg()
    saved = read_json(layout.quality / "quality.json")
    assert saved == json.loads(json.dumps(summary))
    assert summary["privacy_passed"] is True and summary["config_digest"] == quality_digest(cfg)
    assert summary["class_names"] == CLASSES and summary["measured_on"] == "image"
    assert [r["fold"] for r in summary["folds"]] == [0, 1]
    f0, f1 = summary["folds"]
    assert f0["train_ids_source"].endswith("train_ids.json") and f0["n_train"] == PER_CLASS - 1
    assert f1["train_ids_source"] == "ddpm/fold_1/train_ids.json" and f1["n_train"] == PER_CLASS
    assert f0["n_synthetic"] == 12 and f0["generator_ids"] == ["ddpm-fold0"]
    enc = f0["encoder"]
    assert enc["kind"] == "trained" and enc["objective"] == "cross_entropy" and 0 <= enc["train_accuracy"] <= 1
    assert summary["encoder"]["kind"] == "trained" and summary["encoder"]["per_fold"][0]["objective"] == "cross_entropy"
    assert set(f0["metrics"]) == {"overall", *CLASSES}
    for group in f0["metrics"].values():
        assert set(group) == set(COMPARISONS)
        ref = group["reference"]
        # Two different halves of real data: FD is finite and positive (0 only for identical moments).
        assert np.isfinite(ref["fd"]) and ref["fd"] > 0 and 0 <= ref["precision"] <= 1 and 0 <= ref["recall"] <= 1
        # KID's subsets (KID_SUBSET_SIZE > n) are the whole smaller half, so they vary, and std is more
        # than round-off, exactly when the halves differ in size and the larger one is subsampled.
        assert np.isfinite(ref["kid_std"]) and (ref["kid_std"] > 1e-9 * max(1.0, abs(ref["kid_mean"]))) == (
            ref["n_real"] != ref["n_fake"]), ref
    assert f0["metrics"]["overall"]["synthetic_vs_train"]["n_fake"] == 12
    div = f0["diversity"]["overall"]
    assert div["synthetic"]["method"] == "ssim" and -1 <= div["synthetic"]["mean"] <= 1 and div["real_train"]["pairs"] > 0
    mem = f0["memorisation"]
    assert mem["ncc"]["synthetic"]["n"] == 12 and mem["ncc"]["synthetic"]["max"] < 0.95
    assert mem["ncc"]["reference_heldout"]["n"] == PER_CLASS and set(mem["ncc"]["per_class"]) == set(CLASSES)
    assert len(mem["closest_pairs"]) == 8
    assert mem["closest_pairs"][0]["ncc"] >= mem["closest_pairs"][-1]["ncc"]
    by_feature = mem["closest_pairs_by_feature"]
    assert len(by_feature) == 8 and by_feature[0]["feature_cosine"] >= by_feature[-1]["feature_cosine"]
    assert -1 <= mem["feature_cosine"]["synthetic"]["max"] <= 1 + 1e-9
    assert f0["gate"]["passed"] and f0["gate"]["offending_ids"] == []
    for name in ("ncc_hist.png", "nearest_pairs_fold0.png", "nearest_pairs_fold1.png"):
        assert (layout.quality / name).stat().st_size > 1000
    assert not (layout.quality / "dropped.json").exists()
    raise_if_failed(summary)  # passes silently


def test_rerun_is_skipped_unless_forced_and_is_deterministic(honest, monkeypatch):
    layout, first = honest
    calls = []
    real_train = stage.train_encoder
    monkeypatch.setattr(stage, "train_encoder", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    assert assess_quality(_cfg(), layout) == first and calls == []
    again = assess_quality(_cfg(), layout, force=True)
    assert len(calls) == 2  # one encoder per fold
    assert json.loads(json.dumps(again)) == read_json(layout.quality / "quality.json") == json.loads(json.dumps(first))


def test_memorising_generator_fails_the_gate_and_is_listed_for_dropping(artifacts):
    layout, images, labels, ids, folds = artifacts
    rng = np.random.default_rng(1)
    train_idx = [ids.index(i) for i in folds[1]["train"]]
    copies = images[train_idx[:8]] + 0.01 * rng.normal(size=(8, 1, SIZE, SIZE)).astype(np.float32)
    honest = np.concatenate([_images(4, c, rng) for c in range(2)])
    syn = _synthetic(1, np.concatenate([copies, honest]), np.concatenate([labels[train_idx[:8]], [0, 0, 0, 0, 1, 1, 1, 1]]))
    write_parquet(syn, layout.synthetic(1) / "part-0.parquet", SYNTHETIC_SCHEMA)
    _stamp(layout, _cfg())

    summary = assess_quality(_cfg("quality.drop_memorised=true"), layout)
    gate = summary["folds"][1]["gate"]
    assert summary["privacy_passed"] is False and summary["privacy_passed_after_drop"] is True
    assert summary["folds"][0]["gate"]["passed"] and not gate["passed"]
    assert sorted(gate["offending_ids"]) == syn.ids[:8] and gate["fraction"] == pytest.approx(0.5)
    pairs = summary["folds"][1]["memorisation"]["closest_pairs"]
    assert {p["real_id"] for p in pairs} == {ids[i] for i in train_idx[:8]} and pairs[0]["ncc"] > 0.99
    dropped = read_json(layout.quality / "dropped.json")
    assert dropped["ids"] == {"0": [], "1": gate["offending_ids"]}
    with pytest.raises(PrivacyGateError, match="fold 1: 8/16"):
        raise_if_failed(summary)
    # Turning dropping off removes the stale list, and the run still fails.
    summary = assess_quality(_cfg(), layout)
    assert not (layout.quality / "dropped.json").exists() and summary["privacy_passed"] is False


def test_missing_inputs_raise_stage_error(artifacts):
    layout, *_ = artifacts
    for k in range(2):
        (layout.synthetic(k) / "part-0.parquet").unlink()
    _stamp(layout, _cfg())  # manifests that list no shards
    with pytest.raises(StageError, match="raysynth sample"):
        assess_quality(_cfg(), layout)
    layout.data_parquet.unlink()
    with pytest.raises(StageError, match="raysynth prepare"):
        assess_quality(_cfg(), layout)


def test_leaked_test_ids_raise_stage_error(artifacts):
    layout, _, _, _, folds = artifacts
    write_json(layout.ddpm(0) / "train_ids.json", {"train_ids": folds[0]["train"] + folds[0]["test"][:1]})
    with pytest.raises(StageError, match="test ids"):
        assess_quality(_cfg(), layout)


def test_3d_segmentation_single_class_uses_denoising_encoder(tmp_path):
    """3D volumes with masks and one class: metrics on the image channel, autoencoder features."""
    rng = np.random.default_rng(2)
    layout = Layout.at(tmp_path)
    size = 8
    vol = lambda n: np.tanh(gaussian_filter(rng.normal(size=(n, 1, size, size, size)), (0, 0, 1, 1, 1)) * 3).astype(np.float32)
    images, ids = vol(8), [f"v{i}" for i in range(8)]
    masks = (images[:, 0] > 0.5).astype(np.uint8)
    write_parquet(ImageSet(ids=ids, subjects=ids, labels=np.zeros(8, np.int64), images=images, masks=masks),
                  layout.data_parquet)
    write_json(layout.fingerprint, {"class_names": ["brain"], "dims": 3, "task": "segmentation"})
    write_json(layout.splits, {"folds": [{"fold": 0, "train": ids[:6], "test": ids[6:]}]})
    syn = _synthetic(0, vol(5), np.zeros(5, np.int64))
    syn.masks = (syn.images[:, 0] > 0.5).astype(np.uint8)
    write_parquet(syn, layout.synthetic(0) / "part-0.parquet", SYNTHETIC_SCHEMA)
    _stamp(layout, _cfg("data.dims=3", "data.task=segmentation"))
    summary = assess_quality(_cfg("data.dims=3", "data.task=segmentation"), layout)
    fold = summary["folds"][0]
    assert summary["measured_on"].startswith("image channel only") and summary["dims"] == 3
    assert fold["encoder"]["objective"] == "denoising_autoencoder" and fold["encoder"]["train_accuracy"] is None
    assert np.isfinite(fold["metrics"]["brain"]["synthetic_vs_train"]["fd"]) and fold["metrics"]["brain"][
        "synthetic_vs_train"]["fd"] > 0  # distinct sets: positive, not merely the clamp's >= 0
    assert (layout.quality / "nearest_pairs_fold0.png").is_file()


def test_a_gate_whose_threshold_reaches_one_is_inconclusive_not_passed(artifacts):
    """Held-out real images with copies in the training part (duplicates split across folds) push the
    reference threshold to 1, where no sample can be flagged: the verdict is inconclusive."""
    layout, images, labels, ids, folds = artifacts
    copies = images.copy()
    train0 = [ids.index(i) for i in folds[0]["train"]]
    for j, i in enumerate(ids.index(t) for t in folds[0]["test"]):
        copies[i] = images[train0[j % len(train0)]]
    write_parquet(ImageSet(ids=ids, subjects=ids, labels=labels, images=copies), layout.data_parquet)
    summary = assess_quality(_cfg(), layout, force=True)
    gate0 = summary["folds"][0]["gate"]
    assert gate0["threshold"] == pytest.approx(1.0) and gate0["discriminates"] is False and gate0["passed"] is False
    assert summary["privacy_passed"] is False and summary["privacy_verdict"] == "inconclusive"
    with pytest.raises(PrivacyGateError, match="inconclusive"):
        raise_if_failed(summary)
