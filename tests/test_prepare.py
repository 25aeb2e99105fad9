"""The prepare stage and its folds: artifacts, idempotency, atomicity, and split properties."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from raysynth.config import load_config
from raysynth.data.external import external_test_set
from raysynth.artifacts import read_prepared as load_prepared
from raysynth.stages.prepare import prepare
from raysynth.data.schema import read_parquet
from raysynth.data.splits import make_splits
from raysynth.errors import InputError, StageError
from raysynth.artifacts import Layout, read_json

# ../shared/data beside the checkout (read in place, never copied); the tests skip without it.
DEV_SET = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-mri-4class" / "Training"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSYNTH_CACHE", str(tmp_path / "cache"))


def config(*overrides: str):
    return load_config("smoke", overrides=["data.num_scans=16", "data.image_size=16", *overrides])


def mtimes(layout: Layout) -> list[int]:
    return [p.stat().st_mtime_ns for p in (layout.data_parquet, layout.fingerprint, layout.splits)]


# ---- splits --------------------------------------------------------------------------------


def _records(n_subjects=30, per_subject=2, seed=0):
    rng = np.random.default_rng(seed)
    subject_labels = rng.integers(0, 3, n_subjects)
    subjects = [f"p{i:02d}" for i in range(n_subjects) for _ in range(per_subject)]
    labels = [int(subject_labels[i]) for i in range(n_subjects) for _ in range(per_subject)]
    ids = [f"{s}_z{j}" for i, s in enumerate(subjects) for j in [i % per_subject]]
    return ids, labels, subjects


@pytest.mark.parametrize("folds, repeats", [(2, 1), (3, 2), (5, 1)])
def test_split_properties(folds, repeats):
    ids, labels, subjects = _records()
    splits = make_splits(labels, subjects, folds, repeats, seed=7, ids=ids)
    assert [s["fold"] for s in splits] == list(range(folds * repeats))
    assert [s["repeat"] for s in splits] == [r for r in range(repeats) for _ in range(folds)]
    subject_of, label_of = dict(zip(ids, subjects)), dict(zip(ids, labels))
    overall = np.bincount(labels) / len(labels)
    for r in range(repeats):
        parts = [s for s in splits if s["repeat"] == r]
        tests = [i for s in parts for i in s["test"]]
        assert sorted(tests) == sorted(ids)  # the test parts of a repeat partition the records
        for s in parts:
            assert set(s["train"]) | set(s["test"]) == set(ids)
            train_subjects = {subject_of[i] for i in s["train"]}
            assert train_subjects.isdisjoint(subject_of[i] for i in s["test"])  # groups stay whole
            share = np.bincount([label_of[i] for i in s["test"]], minlength=3) / len(s["test"])
            assert np.abs(share - overall).max() < 0.25  # stratified
    assert splits == make_splits(labels, subjects, folds, repeats, seed=7, ids=ids)
    assert splits != make_splits(labels, subjects, folds, repeats, seed=8, ids=ids)
    if repeats > 1:
        assert splits[0]["test"] != splits[folds]["test"]


def test_splits_default_to_positions_and_validate():
    splits = make_splits([0, 1] * 4, [str(i) for i in range(8)], folds=2)
    assert sorted(splits[0]["test"] + splits[1]["test"]) == list(range(8))
    with pytest.raises(ValueError, match="folds"):
        make_splits([0, 1], ["a", "b"], folds=1)
    with pytest.raises(ValueError, match="one entry per record"):
        make_splits([0, 1], ["a"], folds=2)
    with pytest.raises(InputError, match="class '1'"):
        make_splits([0, 0, 0, 1], ["a", "b", "c", "d"], folds=2)
    with pytest.raises(InputError, match="class 'c' has 0"):
        make_splits([0, 1] * 4, [str(i) for i in range(8)], folds=2, class_names=["a", "b", "c"])


# ---- the stage -----------------------------------------------------------------------------


def test_prepare_writes_artifacts(tmp_path):
    cfg, layout = config(), Layout.at(tmp_path / "out")
    fp = prepare(cfg, layout)
    records, fingerprint, folds = load_prepared(layout, cfg)
    assert fingerprint == fp and read_parquet(layout.data_parquet).ids == records.ids
    assert records.images.shape == (16, 1, 16, 16) and records.masks is None
    assert records.images.min() >= -1 and records.images.max() <= 1
    assert fp["dims"] == 2 and fp["task"] == "classification" and fp["source_kind"] == "phantom"
    assert fp["class_names"] == ["healthy", "lesion"] and fp["num_classes"] == 2
    assert fp["mask_names"] is None and fp["num_mask_classes"] == 0
    assert sum(fp["counts"].values()) == fp["num_records"] == fp["num_subjects"] == 16
    assert fp["counts"] == dict(zip(fp["class_names"], np.bincount(records.labels).tolist()))
    assert fp["shape"] == [1, 16, 16] and len(fp["spacing"]) == 2 and fp["channels"] == ["grey"]
    assert fp["config_digest"] == cfg.section_digest("data", "cv") and fp["raysynth_version"]
    assert fp["intensity"]["raw"]["max"] > 100 and -1 <= fp["intensity"]["normalised"]["mean"] <= 1
    assert fp["sources"] is None and fp["created"]
    splits = read_json(layout.splits)
    assert {k: splits[k] for k in ("seed", "n_folds", "repeats", "stratified_by", "grouped_by")} == {
        "seed": 0, "n_folds": 2, "repeats": 1, "stratified_by": "label", "grouped_by": "subject"}
    assert splits["folds"] == folds and sorted(folds[0]["test"] + folds[1]["test"]) == sorted(records.ids)
    assert not list(layout.prepared.glob(".*tmp"))


def test_prepare_is_idempotent(tmp_path, caplog):
    cfg, layout = config(), Layout.at(tmp_path / "out")
    prepare(cfg, layout)
    before = mtimes(layout)
    with caplog.at_level("INFO", logger="raysynth.stages.prepare"):
        prepare(cfg, layout)
    assert mtimes(layout) == before and "prepare: up to date" in caplog.text
    prepare(cfg, layout, force=True)
    assert all(a > b for a, b in zip(mtimes(layout), before))
    forced = mtimes(layout)
    changed = config("cv.seed=3")  # another config digest: prepared again
    assert prepare(changed, layout)["config_digest"] == changed.section_digest("data", "cv")
    assert mtimes(layout) != forced
    with pytest.raises(StageError, match="another data/cv config"):
        load_prepared(layout, cfg)


def test_load_prepared_before_prepare(tmp_path):
    with pytest.raises(StageError, match="prepare has not run"):
        load_prepared(Layout.at(tmp_path / "nothing"), config())


def _pictures(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("left", "right"):
        for i in range(n):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (10 + i, 14), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_failed_prepare_writes_nothing(tmp_path):
    src = _pictures(tmp_path / "src")
    (src / "left" / "bad.png").write_bytes(b"junk")
    layout = Layout.at(tmp_path / "out")
    with pytest.raises(InputError, match="left/bad.png"):
        prepare(config(f"data.source={src}"), layout)
    assert not layout.prepared.exists()
    good = config()  # a complete earlier run survives a failing one untouched
    prepare(good, layout)
    before = mtimes(layout)
    with pytest.raises(InputError):
        prepare(config(f"data.source={src}"), layout)
    assert mtimes(layout) == before and load_prepared(layout, good)


def test_changed_source_folder_is_prepared_again(tmp_path):
    src = _pictures(tmp_path / "src")
    cfg, layout = config(f"data.source={src}"), Layout.at(tmp_path / "out")
    fp = prepare(cfg, layout)
    assert fp["source_kind"] == "images" and fp["num_records"] == 6
    assert {s["path"] for s in fp["sources"]} == {f"{c}/{i}.png" for c in ("left", "right") for i in range(3)}
    records, _, _ = load_prepared(layout, cfg)
    assert all(rid.startswith("s") and "png" not in rid for rid in records.ids)  # no file names in ids
    Image.fromarray(np.full((9, 9), 3, np.uint8) + np.eye(9, dtype=np.uint8)).save(src / "right" / "9.png")
    assert prepare(cfg, layout)["num_records"] == 7


def test_prepare_nifti_slices_keeps_volumes_together(tmp_path):
    src = tmp_path / "vols"
    src.mkdir()
    lines = ["file,label"]
    for i in range(6):
        data = np.random.default_rng(i).random((12, 10, 9)).astype(np.float32) * 300
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.2, 2.0, 1.0])), src / f"v{i}.nii.gz")
        lines.append(f"v{i}.nii.gz,{'ab'[i % 2]}")
    (src / "labels.csv").write_text("\n".join(lines) + "\n")
    layout = Layout.at(tmp_path / "out")
    cfg = config(f"data.source={src}", "data.slices_per_volume=3")
    prepare(cfg, layout)
    records, fp, folds = load_prepared(layout, cfg)
    assert len(records) == 18 and fp["num_subjects"] == 6 and records.images.shape[1:] == (1, 16, 16)
    subject_of = dict(zip(records.ids, records.subjects))
    for fold in folds:
        assert {subject_of[i] for i in fold["train"]}.isdisjoint(subject_of[i] for i in fold["test"])
        assert all(n == 3 for n in Counter(subject_of[i] for i in fold["test"]).values())


def test_prepare_3d_segmentation_phantom(tmp_path):
    cfg = config("data.dims=3", "data.num_scans=8", "data.task=segmentation")
    layout = Layout.at(tmp_path / "out")
    fp = prepare(cfg, layout)
    records, _, _ = load_prepared(layout, cfg)
    assert records.images.shape == (8, 1, 16, 16, 16) and records.masks.shape == (8, 16, 16, 16)
    assert fp["mask_names"] == ["background", "csf", "grey_matter", "white_matter", "lesion"]
    assert fp["num_mask_classes"] == 5 and fp["shape"] == [1, 16, 16, 16]
    assert [bool((m == 4).any()) for m in records.masks] == [bool(y) for y in records.labels]


def test_external_test_set(tmp_path):
    cfg = config()
    ext = external_test_set(cfg, num_scans=6)
    assert ext.images.shape == (6, 1, 16, 16) and ext.ids[0] == "x0000"
    assert set(ext.labels.tolist()) == {0, 1}
    with pytest.raises(InputError, match="embedded"):
        external_test_set(config(f"data.source={tmp_path}"))


@pytest.mark.skipif(not DEV_SET.is_dir(), reason=f"dev dataset not present at {DEV_SET}")
def test_prepare_dev_dataset(tmp_path):
    layout = Layout.at(tmp_path / "out")
    cfg = config(f"data.source={DEV_SET}")
    fp = prepare(cfg, layout)
    on_disk = {d.name: sum(1 for f in d.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
               for d in sorted(DEV_SET.iterdir()) if d.is_dir()}
    assert fp["num_classes"] == len(on_disk) and fp["shape"] == [1, 16, 16]
    assert fp["counts"] == on_disk and fp["num_records"] == sum(on_disk.values())
    records, _, folds = load_prepared(layout, cfg)
    assert len(folds) == 2 and records.images.min() >= -1 and records.images.max() <= 1
