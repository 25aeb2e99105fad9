"""The bad-input corpus of issue 8, each case through the library *and* the command line.

Every case either stops with an :class:`InputError` whose one-line message names the file (and
``raysynth prepare`` exits 2 with a single ``raysynth: error:`` line and no traceback, having
written nothing), or, for a per-file problem under ``data.bad_files=skip``, is left out with a
warning naming the file. Inputs that are merely unusual (non-image files, symlinks, mixed
orientations and spacings, non-UTF-8 file names) must be handled, not refused.

tests/test_bad_input.py already checks most of these through ``load_source``; this file adds the
missing cases and the CLI contract for all of them.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from raysynth.cli import main
from raysynth.config import load_config
from raysynth.stages.prepare import prepare
from raysynth.data.sources import load_source
from raysynth.errors import InputError
from raysynth.artifacts import Layout, read_json

REPO = Path(__file__).resolve().parents[1]


# ---- tiny inputs -------------------------------------------------------------------------------


def picture(path: Path, seed: int = 0, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1], dtype=np.uint8)).save(path)


def volume(path: Path, data: np.ndarray | None = None, seed: int = 0, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random((8, 9, 7)).astype(np.float32) if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def pictures(root: Path, n: int = 3) -> Path:
    """Two class folders ``a`` and ``b`` of ``n`` random PNGs each: valid for cv.folds=2 even after
    one extra bad file is skipped."""
    for i in range(n):
        picture(root / "a" / f"a{i}.png", seed=i)
        picture(root / "b" / f"b{i}.png", seed=100 + i)
    return root


def volumes(root: Path, n: int = 6, masks: bool = False, extra: tuple[str, ...] = ()) -> Path:
    """``n`` random volumes ``v{i}.nii.gz`` alternating classes a/b, listed in labels.csv together
    with the ``extra`` files (class a), which the caller writes."""
    for i in range(n):
        volume(root / f"v{i}.nii.gz", seed=i)
        if masks:
            volume(root / f"v{i}_seg.nii.gz", (np.random.default_rng(i).random((8, 9, 7)) > 0.5).astype(np.uint8))
    rows = [f"v{i}.nii.gz,{'ab'[i % 2]}" for i in range(n)] + [f"{name},a" for name in extra]
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    return root


@dataclass
class Case:
    root: Path
    needle: str
    """What the one-line message must name: the file (relative path) or, for a structural
    problem, the class or cause."""
    overrides: list[str] = field(default_factory=list)
    skippable: bool = False
    """A per-file problem: ``data.bad_files=skip`` leaves the file out with a warning."""
    valid_records: int = 6
    """Records that remain once the bad file is skipped."""

    def config(self, *more: str):
        cfg = load_config("smoke", overrides=[*self.overrides, *more])
        cfg.data.source = str(self.root)
        return cfg

    def cli(self, out: Path, *more: str) -> list[str]:
        args = ["prepare", "--preset", "smoke", "--data", str(self.root), "--out", str(out), "-q"]
        for o in [*self.overrides, *more]:
            args += ["--set", o]
        return args


DIMS3 = ["data.dims=3"]
SEG3 = ["data.dims=3", "data.task=segmentation"]


def _truncated_nifti(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("bad.nii.gz",))
    blob = gzip.compress(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)).to_bytes())
    (root / "bad.nii.gz").write_bytes(blob[: len(blob) // 2])
    return Case(root, "bad.nii.gz", DIMS3, skippable=True)


def _nifti_not_gzip(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("bad.nii.gz",))
    (root / "bad.nii.gz").write_bytes(b"plain text, not a gzip stream\n" * 8)
    return Case(root, "bad.nii.gz", DIMS3, skippable=True)


def _nifti_4d(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("bad.nii.gz",))
    volume(root / "bad.nii.gz", np.random.rand(8, 9, 7, 3).astype(np.float32))
    return Case(root, "bad.nii.gz", DIMS3)


def _nifti_2d_for_dims3(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("bad.nii.gz",))
    volume(root / "bad.nii.gz", np.random.rand(8, 9).astype(np.float32))
    return Case(root, "bad.nii.gz", DIMS3)


def _nan_voxels(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("bad.nii.gz",))
    data = np.random.default_rng(0).random((8, 9, 7)).astype(np.float32)
    data[1, 2, 3] = np.nan
    volume(root / "bad.nii.gz", data)
    return Case(root, "bad.nii.gz", DIMS3, skippable=True)


def _inf_voxels(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("bad.nii.gz",))
    data = np.random.default_rng(0).random((8, 9, 7)).astype(np.float32)
    data[0, 0, 0] = -np.inf
    volume(root / "bad.nii.gz", data)
    return Case(root, "bad.nii.gz", ["data.dims=2"], skippable=True)


def _constant_volume(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("bad.nii.gz",))
    volume(root / "bad.nii.gz", np.full((8, 9, 7), 3.0, np.float32))
    return Case(root, "bad.nii.gz", DIMS3, skippable=True)


def _constant_picture(tmp: Path) -> Case:
    root = pictures(tmp / "d")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "a" / "black.png")
    return Case(root, "a/black.png", skippable=True)


def _mask_wrong_shape(tmp: Path) -> Case:
    root = volumes(tmp / "d", masks=True)
    volume(root / "v3_seg.nii.gz", np.zeros((8, 9, 6), np.uint8))
    return Case(root, "v3_seg.nii.gz", SEG3)


def _mask_wrong_shape_2d(tmp: Path) -> Case:
    root = pictures(tmp / "d")
    for p in sorted(root.rglob("*.png")):
        Image.fromarray(((np.random.default_rng(1).random((10, 12)) > 0.5) * 255).astype(np.uint8)).save(
            p.with_name(p.stem + "_seg.png"))
    Image.fromarray(np.zeros((11, 12), np.uint8)).save(root / "b" / "b1_seg.png")
    return Case(root, "b/b1_seg.png", ["data.task=segmentation"])


def _mask_labels_too_high(tmp: Path) -> Case:
    root = volumes(tmp / "d", masks=True)
    seg = np.zeros((8, 9, 7), np.int16)
    seg[2, 2, 2] = 99
    volume(root / "v4_seg.nii.gz", seg)
    return Case(root, "v4_seg.nii.gz", SEG3)


def _mask_labels_negative(tmp: Path) -> Case:
    root = volumes(tmp / "d", masks=True)
    seg = np.zeros((8, 9, 7), np.int16)
    seg[2, 2, 2] = -1
    volume(root / "v0_seg.nii.gz", seg)
    return Case(root, "v0_seg.nii.gz", SEG3)


def _mask_labels_fractional(tmp: Path) -> Case:
    root = volumes(tmp / "d", masks=True)
    seg = np.zeros((8, 9, 7), np.float32)
    seg[2, 2, 2] = 0.5
    volume(root / "v2_seg.nii.gz", seg)
    return Case(root, "v2_seg.nii.gz", SEG3)


def _zero_byte_nifti(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("empty.nii.gz",))
    (root / "empty.nii.gz").write_bytes(b"")
    return Case(root, "empty.nii.gz", DIMS3, skippable=True)


def _zero_byte_picture(tmp: Path) -> Case:
    root = pictures(tmp / "d")
    (root / "b" / "empty.png").write_bytes(b"")
    return Case(root, "b/empty.png", skippable=True)


def _corrupt_picture(tmp: Path) -> Case:
    root = pictures(tmp / "d")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" * 4)
    return Case(root, "a/broken.jpg", skippable=True)


def _single_class(tmp: Path) -> Case:
    root = tmp / "d"
    for i in range(4):
        picture(root / "healthy" / f"x{i}.png", seed=i)
    return Case(root, "only one class")


def _class_fewer_than_folds(tmp: Path) -> Case:
    root = pictures(tmp / "d")
    for p in sorted((root / "b").glob("*.png"))[1:]:
        p.unlink()
    return Case(root, "'b'", ["cv.folds=2"])


def _absurd_header(tmp: Path, gz: bool) -> Case:
    name = "huge.nii.gz" if gz else "huge.nii"
    root = volumes(tmp / "d", extra=(name,))
    header = nib.Nifti1Header()
    header.set_data_shape((10000, 10000, 10000))  # claims 1 TB of uint8
    header.set_data_dtype(np.uint8)
    buf = io.BytesIO()
    header.write_to(buf)
    buf.write(b"\0" * (int(header.get_data_offset()) - buf.tell() + 64))
    (root / name).write_bytes(gzip.compress(buf.getvalue()) if gz else buf.getvalue())
    return Case(root, name, DIMS3, skippable=True)


def _zero_size_dimension(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("flat.nii.gz",))
    volume(root / "flat.nii.gz", np.zeros((0, 9, 7), np.float32))
    return Case(root, "flat.nii.gz", DIMS3, skippable=True)


def _non_finite_affine(tmp: Path) -> Case:
    root = volumes(tmp / "d", extra=("nanaffine.nii.gz",))
    img = nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 7)).astype(np.float32), np.eye(4))
    header = img.header
    header.set_qform(None, code=0)
    header["srow_x"][0] = np.nan  # a corrupt sform: the voxel-to-world matrix holds a NaN
    header["sform_code"] = 1
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header), root / "nanaffine.nii.gz")
    return Case(root, "nanaffine.nii.gz", DIMS3, skippable=True)


def _labels_csv_not_utf8(tmp: Path) -> Case:
    root = volumes(tmp / "d")
    names = ["caf\xe9", "th\xe9"]
    rows = "file,label\n" + "".join(f"v{i}.nii.gz,{names[i % 2]}\n" for i in range(6))
    (root / "labels.csv").write_bytes(rows.encode("latin-1"))  # a spreadsheet export in Windows-1252
    return Case(root, "labels.csv", DIMS3)


def _symlink_loop_file(tmp: Path) -> Case:
    root = pictures(tmp / "d")
    os.symlink("loop.png", root / "a" / "loop.png")  # resolves to itself: ELOOP on open
    return Case(root, "a/loop.png", skippable=True)


def _dangling_symlink(tmp: Path) -> Case:
    root = pictures(tmp / "d")
    os.symlink("/nonexistent/scan.png", root / "b" / "moved.png")
    return Case(root, "b/moved.png", skippable=True)


# ---- real folders (issue 15) -------------------------------------------------------------------


def _labels_csv_blank_subject(tmp: Path) -> Case:
    root = volumes(tmp / "d")
    rows = [f"v{i}.nii.gz,{'ab'[i % 2]},{'' if i == 4 else f'sub{i // 2}'},T1,42" for i in range(6)]
    (root / "labels.csv").write_text("file,label,subject,modality,age\n" + "\n".join(rows) + "\n")
    return Case(root, "v4.nii.gz", DIMS3)


def _subject_pattern_matches_nothing(tmp: Path) -> Case:
    return Case(pictures(tmp / "d"), "a0.png", ["data.subject_pattern=^(TCGA_[A-Z]{2}_[0-9]{4})"])


def _rgb_picture_in_a_grey_set(tmp: Path) -> Case:
    root = pictures(tmp / "d")
    colour = np.random.default_rng(7).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(colour).save(root / "a" / "colour.png")
    return Case(root, "a/colour.png")


def _grey_picture_in_an_rgb_set(tmp: Path) -> Case:
    root = tmp / "d"
    for i in range(3):
        for cls, seed in (("a", i), ("b", 100 + i)):
            (root / cls).mkdir(parents=True, exist_ok=True)
            rgb = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / cls / f"{cls}{i}.png")
    picture(root / "b" / "grey.png", seed=9)
    return Case(root, "b/grey.png", ["data.channels=rgb"])


def _sequence_missing(tmp: Path) -> Case:
    """One NIfTI per sequence; subject s3 has no flair. A per-scan problem: skippable."""
    root = tmp / "d"
    rows = []
    for i in range(7):
        for seq in ("t1", "flair"):
            if (i, seq) != (3, "flair"):
                volume(root / f"s{i}_{seq}.nii.gz", seed=10 * i + len(seq))
                rows.append(f"s{i}_{seq}.nii.gz,{'ab'[i % 2]}")
    (root / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    return Case(root, "s3_t1.nii.gz", [*DIMS3, "data.channels=[t1,flair]"], skippable=True)


def _duplicates_with_conflicting_labels(tmp: Path) -> Case:
    root = pictures(tmp / "d")
    (root / "b" / "refiled.png").write_bytes((root / "a" / "a1.png").read_bytes())
    return Case(root, "b/refiled.png")


ERROR_CASES: dict[str, Callable[[Path], Case]] = {
    "truncated .nii.gz": _truncated_nifti,
    ".nii.gz that is not gzip": _nifti_not_gzip,
    "4D NIfTI where 3D is expected": _nifti_4d,
    "2D NIfTI where 3D is expected": _nifti_2d_for_dims3,
    "NaN voxels": _nan_voxels,
    "Inf voxels": _inf_voxels,
    "constant volume": _constant_volume,
    "constant picture": _constant_picture,
    "mask of the wrong shape (3D)": _mask_wrong_shape,
    "mask of the wrong shape (2D)": _mask_wrong_shape_2d,
    "mask labels above the schema": _mask_labels_too_high,
    "negative mask labels": _mask_labels_negative,
    "fractional mask labels": _mask_labels_fractional,
    "zero-byte NIfTI": _zero_byte_nifti,
    "zero-byte picture": _zero_byte_picture,
    "corrupt picture": _corrupt_picture,
    "single class": _single_class,
    "class with fewer samples than folds": _class_fewer_than_folds,
    "absurd header size (.nii)": lambda tmp: _absurd_header(tmp, gz=False),
    "absurd header size (.nii.gz)": lambda tmp: _absurd_header(tmp, gz=True),
    "NIfTI with a zero-size dimension": _zero_size_dimension,
    "NIfTI with a NaN in its affine": _non_finite_affine,
    "labels.csv not UTF-8": _labels_csv_not_utf8,
    "symlink loop with an image name": _symlink_loop_file,
    "dangling symlink with an image name": _dangling_symlink,
    "labels.csv with extra columns and a blank subject": _labels_csv_blank_subject,
    "subject pattern that matches nothing": _subject_pattern_matches_nothing,
    "RGB picture in a grey set": _rgb_picture_in_a_grey_set,
    "grey picture in an RGB set": _grey_picture_in_an_rgb_set,
    "sequence missing for one subject": _sequence_missing,
    "duplicate group with conflicting labels": _duplicates_with_conflicting_labels,
}



SKIPPABLE = [
    "truncated .nii.gz", ".nii.gz that is not gzip", "NaN voxels", "Inf voxels", "constant volume",
    "constant picture", "zero-byte NIfTI", "zero-byte picture", "corrupt picture", "absurd header size (.nii)",
    "absurd header size (.nii.gz)", "NIfTI with a zero-size dimension", "NIfTI with a NaN in its affine",
    "symlink loop with an image name", "dangling symlink with an image name", "sequence missing for one subject",
]
"""Per-file problems: ``bad_files=skip`` leaves them out. The rest are structural and stay errors."""


def _params(names):
    return [pytest.param(n, id=n) for n in names]


def _one_error_line(err: str, needle: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("raysynth: error: "), err
    assert needle in lines[0], err
    return lines[0]


# ---- error cases: library, CLI, skip policy ----------------------------------------------------


@pytest.mark.parametrize("name", _params(ERROR_CASES))
def test_prepare_raises_input_error_naming_the_file(tmp_path, name):
    case = ERROR_CASES[name](tmp_path)
    layout = Layout.at(tmp_path / "out")
    with pytest.raises(InputError) as info:
        prepare(case.config(), layout)
    message = str(info.value)
    assert "\n" not in message and case.needle in message, message
    assert not layout.fingerprint.exists() and not layout.data_parquet.exists()


@pytest.mark.parametrize("name", _params(ERROR_CASES))
def test_cli_prints_one_error_line_and_writes_nothing(tmp_path, capsys, name):
    case = ERROR_CASES[name](tmp_path)
    out = tmp_path / "out"
    code = main(case.cli(out))
    _, err = capsys.readouterr()
    _one_error_line(err, case.needle)
    assert code == 2
    assert not (out / "prepared" / "fingerprint.json").exists()
    assert not (out / "prepared" / "data.parquet").exists()


@pytest.mark.parametrize("name", _params(SKIPPABLE))
def test_skip_policy_leaves_the_file_out_with_a_warning(tmp_path, capsys, caplog, name):
    case = ERROR_CASES[name](tmp_path)
    assert case.skippable
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = main(case.cli(out, "data.bad_files=skip"))
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(case.needle in w for w in warnings), warnings
    fingerprint = read_json(out / "prepared" / "fingerprint.json")
    assert fingerprint["skipped"] == [case.needle]
    assert fingerprint["num_records"] == case.valid_records


def test_the_skip_list_matches_the_cases(tmp_path):
    """SKIPPABLE and each case's own flag agree (a guard against editing one only)."""
    for i, (name, build) in enumerate(ERROR_CASES.items()):
        assert build(tmp_path / str(i)).skippable == (name in SKIPPABLE), name


def test_unreadable_file(tmp_path, capsys):
    """A file that stats fine but cannot be read, even by root (CI runs as root, so chmod 000 would
    not do): a link named like an image to a directory, whose open() fails with EISDIR. (A FIFO or
    a directory named ``x.png`` is not a regular file, so the loader does not list it at all.)"""
    import threading

    def within(seconds: float, call):
        """Run ``call`` in a thread and fail, rather than hang the suite, if it has not returned."""
        result: dict = {}

        def run():
            try:
                result["value"] = call()
            except BaseException as exc:  # re-raised below, in the test's thread
                result["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(seconds)
        assert not worker.is_alive(), f"still reading after {seconds} s: the loader blocks on this input"
        if "error" in result:
            raise result["error"]
        return result["value"]

    root = pictures(tmp_path / "d")
    (tmp_path / "elsewhere").mkdir()  # outside the data folder, so not a class folder
    os.symlink(tmp_path / "elsewhere", root / "a" / "locked.png")
    with pytest.raises(InputError, match="a/locked.png: unreadable image"):
        within(60, lambda: load_source(Case(root, "").config().data))
    assert within(120, lambda: main(Case(root, "").cli(tmp_path / "out"))) == 2
    _one_error_line(capsys.readouterr().err, "a/locked.png")
    assert within(120, lambda: main(Case(root, "").cli(tmp_path / "out2", "data.bad_files=skip"))) == 0
    assert read_json(tmp_path / "out2" / "prepared" / "fingerprint.json")["skipped"] == ["a/locked.png"]


# ---- inputs that are unusual but fine ----------------------------------------------------------


def _prepare_ok(case: Case, tmp_path: Path, capsys) -> dict:
    out = tmp_path / "out"
    code = main(case.cli(out))
    _, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, err
    return read_json(out / "prepared" / "fingerprint.json")


def test_non_image_files_in_class_folders_are_ignored(tmp_path, capsys):
    root = pictures(tmp_path / "d")
    (root / "a" / "README.txt").write_text("scanner notes")
    (root / "a" / "notes.csv").write_text("x,y\n1,2\n")
    (root / "a" / "a0.png.txt").write_text("not an image despite the name")
    (root / "b" / ".DS_Store").write_bytes(b"\0\1\2")
    (root / "b" / "._b0.png").write_bytes(b"\0AppleDouble")  # macOS resource fork: hidden, not a picture
    (root / "b" / "thumbs").mkdir()
    (root / "b" / "thumbs" / "index.html").write_text("<html></html>")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    fingerprint = _prepare_ok(Case(root, ""), tmp_path, capsys)
    assert fingerprint["class_names"] == ["a", "b"]
    assert fingerprint["num_records"] == 6 and fingerprint["skipped"] == []


def test_symlink_loops_inside_a_class_folder_are_not_followed(tmp_path, capsys):
    root = pictures(tmp_path / "d")
    os.symlink(".", root / "a" / "here")
    os.symlink("..", root / "a" / "up")
    os.symlink("../b", root / "a" / "sideways")
    raw = load_source(Case(root, "").config().data)
    assert sorted(s.source for s in raw.scans) == [f"{c}/{c}{i}.png" for c in "ab" for i in range(3)]
    fingerprint = _prepare_ok(Case(root, ""), tmp_path, capsys)
    assert fingerprint["num_records"] == 6


def test_symlink_loop_back_to_the_data_folder(tmp_path, capsys, caplog):
    root = pictures(tmp_path / "d")
    os.symlink(root, root / "loop")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        code = main(Case(root, "").cli(out))
    _, err = capsys.readouterr()
    if code == 2:  # refused: one line naming the loop
        _one_error_line(err, "loop")
    else:  # or left out with a warning: the real classes and images only
        assert code == 0 and "Traceback" not in err, err
        fingerprint = read_json(out / "prepared" / "fingerprint.json")
        assert fingerprint["class_names"] == ["a", "b"], fingerprint["class_names"]
        assert fingerprint["num_records"] == 6
        assert any("loop" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def _asymmetric_volume() -> np.ndarray:
    """An object with no symmetry, so a wrong flip or axis order shows."""
    rng = np.random.default_rng(0)
    vol = np.zeros((20, 24, 18), np.float32)
    vol[3:15, 5:20, 4:12] = 1.0
    vol[4:8, 6:9, 5:7] = 3.0
    vol[10:13, 15:19, 8:11] = 2.0
    return vol + 0.05 * rng.random(vol.shape).astype(np.float32)


def _mixed_geometry(root: Path) -> Path:
    """The same object stored four ways: RAS 1 mm, LPS (x and y flipped), axes permuted to
    (z, x, y), and RAS at 2 mm (downsampled)."""
    vol = _asymmetric_volume()
    ras = np.eye(4)
    ras[:3, 3] = [-10, -12, -9]
    volume(root / "ras.nii.gz", vol, affine=ras)
    lps = ras.copy()
    lps[0, 0] = lps[1, 1] = -1
    lps[0, 3], lps[1, 3] = -10 + 19, -12 + 23  # same world position for the flipped axes
    volume(root / "lps.nii.gz", vol[::-1, ::-1, :].copy(), affine=lps)
    perm = np.zeros((4, 4))
    perm[2, 0] = perm[0, 1] = perm[1, 2] = perm[3, 3] = 1
    perm[:3, 3] = ras[:3, 3]
    volume(root / "perm.nii.gz", np.transpose(vol, (2, 0, 1)).copy(), affine=perm)
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = ras[:3, 3] + 0.5
    volume(root / "coarse.nii.gz", vol.reshape(10, 2, 12, 2, 9, 2).mean(axis=(1, 3, 5)).astype(np.float32), affine=coarse)
    (root / "labels.csv").write_text("file,label\nras.nii.gz,a\nlps.nii.gz,b\nperm.nii.gz,a\ncoarse.nii.gz,b\n")
    return root


@pytest.mark.parametrize("dims", [3, 2])
def test_mixed_orientations_and_spacings_are_reoriented_and_resampled(tmp_path, capsys, dims):
    from raysynth.data.schema import read_parquet

    root = _mixed_geometry(tmp_path / "d")
    case = Case(root, "", [f"data.dims={dims}", "data.duplicates=keep"])  # one volume stored four ways
    fingerprint = _prepare_ok(case, tmp_path, capsys)
    data = read_parquet(tmp_path / "out" / "prepared" / "data.parquet")
    assert data.images.shape == (4, 1) + (16,) * dims
    assert np.isfinite(data.images).all() and np.abs(data.images).max() <= 1.0
    by_file = {s["path"]: s["subject"] for s in fingerprint["sources"]}
    image = {name: data.images[data.subjects.index(by_file[name])] for name in by_file}
    # Reorientation is exact: LPS and permuted storage give the very same model input as RAS.
    np.testing.assert_allclose(image["lps.nii.gz"], image["ras.nii.gz"], atol=1e-5)
    np.testing.assert_allclose(image["perm.nii.gz"], image["ras.nii.gz"], atol=1e-5)
    # The 2 mm copy is resampled onto the same grid: not equal, but the same anatomy in place.
    if dims == 3:
        assert np.corrcoef(image["coarse.nii.gz"].ravel(), image["ras.nii.gz"].ravel())[0, 1] > 0.9
        assert len(set(fingerprint["spacing"])) == 1  # one isotropic spacing for the whole set


# ---- non-UTF-8 file names ----------------------------------------------------------------------


def _bytes_name_file(folder: Path, raw_name: bytes, payload: bytes) -> str:
    """Create ``folder/raw_name`` through a bytes path (the name is not valid UTF-8)."""
    path = os.fsencode(folder) + b"/" + raw_name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)
    return os.fsdecode(raw_name)  # surrogate-escaped str, as pathlib lists it


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (10, 12), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in its own process, with a real stderr (pytest's capture is strict UTF-8)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "raysynth.cli", *args], capture_output=True, env=env,
                          cwd=REPO, timeout=300)


def test_non_utf8_file_name_is_read_by_the_loader(tmp_path):
    root = pictures(tmp_path / "d")
    name = _bytes_name_file(root / "a", b"caf\xe9-\xff.png", _png_bytes(7))
    raw = load_source(Case(root, "").config().data)
    assert f"a/{name}" in [s.source for s in raw.scans] and len(raw.scans) == 7


def test_non_utf8_file_name_through_prepare(tmp_path, capsys):
    root = pictures(tmp_path / "d")
    _bytes_name_file(root / "a", b"caf\xe9-\xff.png", _png_bytes(7))
    out = tmp_path / "out"
    code = main(Case(root, "").cli(out))
    assert code == 0 and "Traceback" not in capsys.readouterr().err
    fingerprint = json.loads((out / "prepared" / "fingerprint.json").read_text())  # still valid JSON
    assert fingerprint["num_records"] == 7


def test_non_utf8_file_name_of_a_bad_file_is_named_by_the_loader(tmp_path):
    root = pictures(tmp_path / "d")
    name = _bytes_name_file(root / "b", b"bad-\xff.png", b"not a picture at all" * 4)
    with pytest.raises(InputError) as info:
        load_source(Case(root, "").config().data)
    assert f"b/{name}" in str(info.value) and "\n" not in str(info.value)


def test_non_utf8_file_name_of_a_bad_file_gives_one_cli_line(tmp_path):
    root = pictures(tmp_path / "d")
    _bytes_name_file(root / "b", b"bad-\xff.png", b"not a picture at all" * 4)
    proc = _cli_subprocess("prepare", "--preset", "smoke", "--data", str(root), "--out", str(tmp_path / "out"), "-q")
    err = proc.stderr.decode("utf-8", errors="replace")
    line = _one_error_line(err, "raysynth: error:")
    assert proc.returncode == 2, err
    assert "b/bad-" in line and ".png" in line  # the undecodable byte is escaped, the file still named
    assert not (tmp_path / "out" / "prepared" / "fingerprint.json").exists()
