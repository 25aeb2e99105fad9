"""Every kind of bad input: an InputError whose one-line message names the file or the cause,
and, under ``bad_files="skip"``, a warning naming each file left out."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from raysynth.config import DataConfig
from raysynth.data.sources import load_source
from raysynth.data.splits import make_splits
from raysynth.errors import InputError


def picture(path: Path, seed: int = 0, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1], dtype=np.uint8)).save(path)


def volume(path: Path, data: np.ndarray | None = None, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random((8, 9, 7)).astype(np.float32) if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def two_classes(root: Path, n: int = 2) -> Path:
    for i in range(n):
        picture(root / "a" / f"a{i}.png", seed=i)
        picture(root / "b" / f"b{i}.png", seed=10 + i)
    return root


def nifti_csv(root: Path, n: int = 4, task_masks: bool = False) -> Path:
    for i in range(n):
        volume(root / f"v{i}.nii.gz", seed=i)
        if task_masks:
            volume(root / f"v{i}_seg.nii.gz", np.zeros((8, 9, 7), np.uint8))
    (root / "labels.csv").write_text("file,label\n" + "".join(f"v{i}.nii.gz,{'ab'[i % 2]}\n" for i in range(n)))
    return root


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source=str(root), **kw)


def fails(config: DataConfig, *needles: str) -> str:
    with pytest.raises(InputError) as info:
        load_source(config)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_missing_folder(tmp_path):
    fails(cfg(tmp_path / "nowhere"), "not found", "nowhere")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    fails(cfg(tmp_path / "empty"), "empty folder")


def test_corrupt_picture(tmp_path):
    root = two_classes(tmp_path / "d")
    (root / "a" / "bad.png").write_bytes(b"\x89PNG garbage, not a picture" * 10)
    fails(cfg(root), "a/bad.png", "unreadable")


def test_truncated_nifti(tmp_path):
    root = nifti_csv(tmp_path / "d")
    blob = gzip.compress(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)).to_bytes())
    (root / "v1.nii.gz").write_bytes(blob[: len(blob) // 2])
    fails(cfg(root, dims=3), "v1.nii.gz", "unreadable")


def test_only_one_class(tmp_path):
    picture(tmp_path / "d" / "only" / "x.png")
    picture(tmp_path / "d" / "only" / "y.png", seed=1)
    fails(cfg(tmp_path / "d"), "only one class", "only")


def test_labels_csv_names_absent_files(tmp_path):
    root = nifti_csv(tmp_path / "d")
    (root / "labels.csv").write_text((root / "labels.csv").read_text() + "ghost.nii.gz,a\n")
    fails(cfg(root, dims=3), "labels.csv", "ghost.nii.gz")


def test_zero_byte_file(tmp_path):
    root = two_classes(tmp_path / "d")
    (root / "b" / "empty.jpg").write_bytes(b"")
    fails(cfg(root), "b/empty.jpg", "zero-byte")


def test_nan_voxels_error_and_skip(tmp_path, caplog):
    root = nifti_csv(tmp_path / "d", n=6)
    data = np.random.default_rng(0).random((8, 9, 7)).astype(np.float32)
    data[2, 3, 4] = np.nan
    volume(root / "v2.nii.gz", data)
    fails(cfg(root, dims=3), "v2.nii.gz", "NaN")
    with caplog.at_level(logging.WARNING, logger="raysynth.data.sources"):
        raw = load_source(cfg(root, dims=3, bad_files="skip"))
    assert len(raw.scans) == 5 and raw.skipped == ["v2.nii.gz"] and "v2.nii.gz" in caplog.text
    assert "s0002" not in [s.id for s in raw.scans]  # ids keep their files: s0003 is still v3


def test_inf_voxels(tmp_path):
    root = nifti_csv(tmp_path / "d")
    data = np.ones((8, 9, 7), np.float32)
    data[0, 0, 0] = np.inf
    volume(root / "v0.nii.gz", data)
    fails(cfg(root, dims=3), "v0.nii.gz", "Inf")


def test_constant_image(tmp_path):
    root = two_classes(tmp_path / "d")
    Image.fromarray(np.full((10, 12), 7, np.uint8)).save(root / "b" / "flat.png")
    fails(cfg(root), "b/flat.png", "constant")


def test_4d_nifti(tmp_path):
    root = nifti_csv(tmp_path / "d")
    volume(root / "v3.nii.gz", np.random.rand(8, 9, 7, 5).astype(np.float32))
    fails(cfg(root, dims=3), "v3.nii.gz", "4D")


def test_mask_of_the_wrong_shape(tmp_path):
    root = nifti_csv(tmp_path / "d", task_masks=True)
    volume(root / "v1_seg.nii.gz", np.zeros((8, 9, 6), np.uint8))
    fails(cfg(root, dims=3, task="segmentation"), "v1_seg.nii.gz", "shape")


def test_mask_labels_out_of_range(tmp_path):
    root = nifti_csv(tmp_path / "d", task_masks=True)
    seg = np.zeros((8, 9, 7), np.int16)
    seg[1, 1, 1] = 99
    volume(root / "v0_seg.nii.gz", seg)
    fails(cfg(root, dims=3, task="segmentation"), "v0_seg.nii.gz", "outside")


def test_missing_mask_for_segmentation(tmp_path):
    root = nifti_csv(tmp_path / "d", task_masks=True)
    (root / "v2_seg.nii.gz").unlink()
    fails(cfg(root, dims=3, task="segmentation"), "v2.nii.gz", "no mask")
    # an unannotated case is skippable: the rest of the folder still loads
    raw = load_source(cfg(root, dims=3, task="segmentation", bad_files="skip"))
    assert raw.skipped == ["v2.nii.gz"] and all(s.mask is not None for s in raw.scans)


def test_absurd_header_size(tmp_path):
    root = nifti_csv(tmp_path / "d")
    header = nib.Nifti1Header()
    header.set_data_shape((10000, 10000, 10000))
    header.set_data_dtype(np.uint8)
    with open(root / "v1.nii", "wb") as fh:  # a header that claims 1 TB, followed by a few bytes
        header.write_to(fh)
        fh.write(b"\0" * (int(header.get_data_offset()) - fh.tell() + 64))
    (root / "v1.nii.gz").unlink()
    (root / "labels.csv").write_text((root / "labels.csv").read_text().replace("v1.nii.gz", "v1.nii"))
    fails(cfg(root, dims=3), "v1.nii", "implausible header size")


def test_class_with_fewer_subjects_than_folds():
    with pytest.raises(InputError, match="'rare'.*cv.folds=5"):
        make_splits([0] * 10 + [1] * 3, [f"p{i}" for i in range(13)], folds=5, class_names=["common", "rare"])


def test_non_image_files_are_ignored(tmp_path):
    root = two_classes(tmp_path / "d")
    (root / "a" / "README.txt").write_text("hello")
    (root / "b" / ".DS_Store").write_bytes(b"\0")
    assert len(load_source(cfg(root)).scans) == 4


def test_skip_policy_skips_files_but_not_folders(tmp_path, caplog):
    root = two_classes(tmp_path / "d", n=3)
    (root / "a" / "bad.png").write_bytes(b"garbage")
    (root / "b" / "zero.png").write_bytes(b"")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "b" / "flat.png")
    with caplog.at_level(logging.WARNING, logger="raysynth.data.sources"):
        raw = load_source(cfg(root, bad_files="skip"))
    assert sorted(raw.skipped) == ["a/bad.png", "b/flat.png", "b/zero.png"] and len(raw.scans) == 6
    for name in raw.skipped:
        assert name in caplog.text
    fails(cfg(tmp_path / "nowhere", bad_files="skip"), "not found")
    (tmp_path / "empty").mkdir()
    fails(cfg(tmp_path / "empty", bad_files="skip"), "empty folder")
    picture(tmp_path / "one" / "c" / "x.png")
    fails(cfg(tmp_path / "one", bad_files="skip"), "only one class")


def test_everything_skipped_is_an_error(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True), (tmp_path / "d" / "b").mkdir()
    (tmp_path / "d" / "a" / "x.png").write_bytes(b"junk")
    (tmp_path / "d" / "b" / "y.png").write_bytes(b"junk")
    fails(cfg(tmp_path / "d", bad_files="skip"), "no readable images")


def test_nan_outside_the_slices_taken(tmp_path):
    root = nifti_csv(tmp_path / "d")
    data = np.random.default_rng(0).random((8, 9, 7)).astype(np.float32)
    data[:, :, 0] = np.nan  # far from the central slice that dims=2 keeps: still a broken file
    volume(root / "v3.nii.gz", data)
    fails(cfg(root, dims=2), "v3.nii.gz", "NaN")


def test_a_class_lost_to_skipping(tmp_path):
    root = two_classes(tmp_path / "d")
    for i in range(2):
        (root / "b" / f"b{i}.png").write_bytes(b"junk")
    fails(cfg(root, bad_files="skip"), "class 'b'", "skipped")


def test_labels_csv_pointing_outside_the_folder(tmp_path):
    root = nifti_csv(tmp_path / "d")
    volume(tmp_path / "elsewhere.nii.gz")
    (root / "labels.csv").write_text((root / "labels.csv").read_text() + "../elsewhere.nii.gz,a\n")
    fails(cfg(root, dims=3), "labels.csv", "outside")
