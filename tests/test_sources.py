"""Loading real inputs: class folders of pictures, NIfTI with labels.csv, masks, slices, the dev set."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from raysynth.config import DataConfig
from raysynth.data.raw import RawSet
from raysynth.data.sources import load_source, mask_path
from raysynth.errors import InputError

# ../shared/data beside the checkout (read in place, never copied); the tests skip without it.
DEV_SET = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-mri-4class" / "Training"


def picture(path: Path, size=(20, 14), mode="L", seed=0) -> np.ndarray:
    """``L``: grey; ``RGB``: grey content stored as RGB (equal channels, as the 4-class JPEG set);
    ``colour``: three different channels (e.g. T1, FLAIR, T1c)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (size[1], size[0], 3) if mode == "colour" else (size[1], size[0]), dtype=np.uint8)
    if mode == "RGB":
        data = np.repeat(data[..., None], 3, axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data, "RGB" if mode == "colour" else mode).save(path)
    return data


def volume(path: Path, shape=(10, 12, 8), affine=None, seed=0, data=None) -> np.ndarray:
    data = np.random.default_rng(seed).random(shape).astype(np.float32) * 900 if data is None else data
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return data


def cfg(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pics"
    picture(root / "tumour" / "b.png", (20, 14), "L", seed=1)
    picture(root / "tumour" / "a.jpg", (31, 17), "RGB", seed=2)
    picture(root / "normal" / "c.bmp", (16, 16), "L", seed=3)
    picture(root / "normal" / "d.tiff", (12, 25), "RGB", seed=4)
    picture(root / "normal" / "d_seg.png", (12, 25), "L", seed=5)  # a mask: never an image
    (root / "normal" / "notes.txt").write_text("not an image")
    (root / "normal" / ".DS_Store").write_bytes(b"\0\1")
    return root


def test_class_folders_of_pictures(folder, caplog):
    with caplog.at_level(logging.DEBUG, logger="raysynth.data.sources"):
        raw = load_source(cfg(folder))
    assert isinstance(raw, RawSet) and raw.kind == "images" and raw.mask_names is None
    assert raw.class_names == ["normal", "tumour"]
    # Sorted relative paths give the ids; file names stay in .source only.
    assert [(s.id, s.source, s.label) for s in raw.scans] == [
        ("s0000", "normal/c.bmp", 0), ("s0001", "normal/d.tiff", 0),
        ("s0002", "tumour/a.jpg", 1), ("s0003", "tumour/b.png", 1),
    ]
    assert [s.image.shape for s in raw.scans] == [(1, 16, 16), (1, 25, 12), (1, 17, 31), (1, 14, 20)]
    assert all(s.image.dtype == np.float32 and s.image.ndim == 3 for s in raw.scans)  # RGB read as grey
    assert all(s.subject == s.id and s.mask is None and s.spacing == (1.0, 1.0) for s in raw.scans)
    assert "notes.txt" in caplog.text and ".DS_Store" in caplog.text


def test_grey_values_are_kept(tmp_path):
    data = picture(tmp_path / "x" / "a" / "1.png", (9, 7), "L")
    picture(tmp_path / "x" / "b" / "2.png", (9, 7), "L", seed=9)
    raw = load_source(cfg(tmp_path / "x"))
    np.testing.assert_array_equal(raw.scans[0].image, data[None].astype(np.float32))


def test_sixteen_bit_grey_is_not_truncated(tmp_path):
    deep = (np.arange(12 * 10, dtype=np.uint16).reshape(10, 12) * 400)  # up to 47600
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        Image.fromarray(deep).save(tmp_path / "d" / cls / "x.png")
    raw = load_source(cfg(tmp_path / "d"))
    np.testing.assert_array_equal(raw.scans[0].image, deep[None].astype(np.float32))


def test_picture_masks_for_segmentation(tmp_path):
    root = tmp_path / "seg"
    for i, cls in enumerate(["a", "a", "b", "b"]):
        picture(root / cls / f"{i}.png", (10, 8), seed=i)
        m = np.zeros((8, 10), np.uint8)
        m[2:5, 3:7] = 255  # black-and-white mask files are common: 255 means foreground
        Image.fromarray(m).save(root / cls / f"{i}_seg.png")
    raw = load_source(cfg(root, task="segmentation"))
    assert len(raw.scans) == 4 and raw.mask_names == ["background", "label_1"]
    assert all(s.mask.dtype == np.uint8 and set(np.unique(s.mask)) == {0, 1} for s in raw.scans)
    assert int(raw.scans[0].mask.sum()) == 12


def test_mask_path_naming(tmp_path):
    (tmp_path / "x.nii.gz").touch(), (tmp_path / "x_seg.nii.gz").touch()
    (tmp_path / "y.jpg").touch(), (tmp_path / "y_seg.png").touch()
    assert mask_path(tmp_path / "x.nii.gz", "_seg") == tmp_path / "x_seg.nii.gz"
    assert mask_path(tmp_path / "y.jpg", "_seg") == tmp_path / "y_seg.png"
    assert mask_path(tmp_path / "y.jpg", "_mask") is None


def _nifti_set(root: Path, labels=("glioma", "healthy", "glioma", "healthy"), shape=(10, 12, 8)):
    lines = ["file,label"]
    for i, label in enumerate(labels):
        volume(root / "vols" / f"v{i}.nii.gz", shape, seed=i)
        seg = np.zeros(shape, np.uint8)
        seg[3:6, 4:8, 2:6] = 1 + i % 2
        volume(root / "vols" / f"v{i}_seg.nii.gz", data=seg)
        lines.append(f"vols/v{i}.nii.gz,{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def test_nifti_with_labels_csv_3d(tmp_path):
    _nifti_set(tmp_path)
    raw = load_source(cfg(tmp_path, dims=3, task="segmentation"))
    assert raw.kind == "nifti" and raw.class_names == ["glioma", "healthy"]
    assert [s.label for s in raw.scans] == [0, 1, 0, 1]
    assert all(s.image.shape == (1, 10, 12, 8) and s.mask.shape == (10, 12, 8) for s in raw.scans)
    assert raw.mask_names == ["background", "label_1", "label_2"]
    assert raw.scans[0].affine.shape == (4, 4) and raw.scans[0].spacing == (1.0, 1.0, 1.0)


def test_nifti_is_reoriented_to_ras(tmp_path):
    # An LPS-like affine (x and y flipped, 2 mm x voxels): canonical RAS flips both axes back.
    affine = np.diag([-2.0, -1.0, 3.0, 1.0])
    data = volume(tmp_path / "v" / "a.nii.gz", (6, 5, 4), affine=affine)
    volume(tmp_path / "v" / "b.nii.gz", (6, 5, 4), affine=affine, seed=1)
    (tmp_path / "v" / "labels.csv").write_text("file,label\na.nii.gz,0\nb.nii.gz,1\n")
    scan = load_source(cfg(tmp_path / "v", dims=3)).scans[0]
    np.testing.assert_allclose(scan.image, data[None, ::-1, ::-1, :])
    assert scan.spacing == (2.0, 1.0, 3.0)
    assert np.all(np.diag(scan.affine)[:3] > 0)


def test_nifti_slices_for_2d(tmp_path):
    _nifti_set(tmp_path, shape=(10, 12, 16))
    raw = load_source(cfg(tmp_path, dims=2, slices_per_volume=3, task="segmentation"))
    assert len(raw.scans) == 12
    assert [s.id for s in raw.scans[:3]] == ["s0000_z00", "s0000_z01", "s0000_z02"]
    assert {s.subject for s in raw.scans[:3]} == {"s0000"}  # slices of a volume travel together
    first = raw.scans[0]
    assert first.image.shape == (1, 12, 10) and first.mask.shape == (12, 10)  # axial plane, anterior up
    vol = np.asarray(nib.load(tmp_path / "vols" / "v0.nii.gz").dataobj)
    planes = [np.rot90(vol[:, :, z]) for z in range(16)]
    assert any(np.array_equal(first.image[0], p) for p in planes)


def test_integer_labels_and_class_folder_nifti(tmp_path):
    root = tmp_path / "ints"
    for i, label in enumerate([2, 0, 2, 0]):
        volume(root / f"v{i}.nii", seed=i)
    (root / "labels.csv").write_text("file,label\n" + "".join(f"v{i}.nii,{y}\n" for i, y in enumerate([2, 0, 2, 0])))
    raw = load_source(cfg(root, dims=3))
    assert raw.class_names == ["0", "2"] and [s.label for s in raw.scans] == [1, 0, 1, 0]

    folders = tmp_path / "folders"
    volume(folders / "a" / "x.nii.gz"), volume(folders / "b" / "y.nii.gz", seed=1)
    volume(folders / "b" / "y_seg.nii.gz", data=np.zeros((10, 12, 8), np.uint8))
    raw = load_source(cfg(folders, dims=3))
    assert raw.kind == "nifti" and [s.source for s in raw.scans] == ["a/x.nii.gz", "b/y.nii.gz"]


def test_classification_ignores_masks(tmp_path):
    _nifti_set(tmp_path)
    (tmp_path / "vols" / "v0_seg.nii.gz").write_bytes(b"broken, but never read")
    raw = load_source(cfg(tmp_path, dims=3))
    assert all(s.mask is None for s in raw.scans) and raw.mask_names is None


def test_embedded_cohort_when_no_source(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSYNTH_CACHE", str(tmp_path))
    raw = load_source(DataConfig(num_scans=6, image_size=16))
    assert raw.kind == "phantom" and len(raw.scans) == 6 and raw.class_names == ["healthy", "lesion"]


def test_3d_from_pictures_is_refused(folder):
    with pytest.raises(InputError, match="dims=3"):
        load_source(cfg(folder, dims=3))


@pytest.mark.skipif(not DEV_SET.is_dir(), reason=f"dev dataset not present at {DEV_SET}")
def test_dev_dataset_loads_as_it_is():
    raw = load_source(cfg(DEV_SET))
    on_disk = {d.name: sum(1 for f in d.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
               for d in sorted(DEV_SET.iterdir()) if d.is_dir()}
    assert raw.class_names == list(on_disk)
    assert np.bincount(raw.labels).tolist() == list(on_disk.values())
    assert all(s.image.ndim == 3 and s.image.shape[0] == 1 and s.image.dtype == np.float32 for s in raw.scans)
    assert len({s.image.shape for s in raw.scans}) > 10  # mixed sizes, all accepted
    assert raw.scans[0].id == "s0000" and "/" in raw.scans[0].source


# ---- several sequences as channels --------------------------------------------------------


def test_rgb_channels_are_kept_and_mismatched_pictures_refused(tmp_path):
    root = tmp_path / "rgb"
    colour = picture(root / "a" / "1.png", (12, 10), "colour", seed=1)
    picture(root / "b" / "2.png", (12, 10), "colour", seed=2)
    raw = load_source(cfg(root, channels="rgb"))
    assert [s.image.shape for s in raw.scans] == [(3, 10, 12)] * 2
    np.testing.assert_array_equal(raw.scans[0].image, np.moveaxis(colour, -1, 0).astype(np.float32))
    # A colour picture in a grey set, and a grey picture in an rgb set: one line naming the file.
    with pytest.raises(InputError, match=r"a/1\.png: a colour picture whose channels differ.*channels=rgb"):
        load_source(cfg(root))
    picture(root / "b" / "3.png", (12, 10), "L", seed=3)
    with pytest.raises(InputError, match=r"b/3\.png: a one-channel \(grey\) picture"):
        load_source(cfg(root, channels="rgb"))


def test_grey_content_stored_as_rgb_reads_as_grey(tmp_path):
    data = picture(tmp_path / "g" / "a" / "1.jpg", (16, 16), "RGB", seed=1)
    picture(tmp_path / "g" / "b" / "2.jpg", (16, 16), "RGB", seed=2)
    raw = load_source(cfg(tmp_path / "g"))
    assert raw.scans[0].image.shape == (1, 16, 16)
    assert np.abs(raw.scans[0].image[0] - data[..., 0]).max() < 40  # JPEG, but the same picture


def _sequences(root: Path, base: str, suffixes, shape=(10, 12, 8), seed=0, seg=True):
    data = {}
    for k, suffix in enumerate(suffixes):
        data[suffix] = volume(root / f"{base}_{suffix}.nii.gz", shape, seed=seed * 10 + k)
    if seg:
        mask = np.zeros(shape, np.uint8)
        mask[2:5, 3:7, 2:4] = 1
        volume(root / f"{base}_seg.nii.gz", data=mask)
    return data


def test_nifti_sequences_stack_into_one_scan(tmp_path):
    root = tmp_path / "brats"
    made = [_sequences(root, f"case{i}", ["t1", "flair"], seed=i) for i in range(3)]
    (root / "labels.csv").write_text("file,label\n" + "".join(
        f"case{i}_t1.nii.gz,{'glioma' if i % 2 else 'healthy'}\n" for i in range(3)))
    raw = load_source(cfg(root, dims=3, channels=["t1", "flair"], task="segmentation"))
    assert [s.image.shape for s in raw.scans] == [(2, 10, 12, 8)] * 3
    assert all(s.mask.shape == (10, 12, 8) for s in raw.scans)
    np.testing.assert_allclose(raw.scans[1].image[0], made[1]["t1"])
    np.testing.assert_allclose(raw.scans[1].image[1], made[1]["flair"])
    # 2D: axial slices of every channel, the same plane
    flat = load_source(cfg(root, dims=2, channels=["t1", "flair"], slices_per_volume=2))
    assert len(flat.scans) == 6 and flat.scans[0].image.shape == (2, 12, 10)


def test_a_missing_sequence_is_one_line_or_a_warned_skip(tmp_path, caplog):
    root = tmp_path / "brats"
    for i in range(4):
        _sequences(root, f"case{i}", ["t1", "flair"] if i != 2 else ["t1"], seed=i, seg=False)
    (root / "labels.csv").write_text("file,label\n" + "".join(f"case{i}_t1.nii.gz,{i % 2}\n" for i in range(4)))
    with pytest.raises(InputError, match=r"^case2 \(listed as case2_t1\.nii\.gz\): no 'flair' sequence \(case2_flair\.nii\.gz\)") as info:
        load_source(cfg(root, dims=3, channels=["t1", "flair"]))
    assert "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="raysynth.data.sources"):
        raw = load_source(cfg(root, dims=3, channels=["t1", "flair"], bad_files="skip"))
    assert len(raw.scans) == 3 and raw.skipped == ["case2_t1.nii.gz"] and "case2 (listed as case2_t1.nii.gz): no 'flair'" in caplog.text


def test_a_labels_csv_listing_every_sequence_file_gives_one_scan_per_subject(tmp_path):
    """brain-mri-3d lists each sequence file on its own row (and names IXI's T1 in capitals)."""
    root = tmp_path / "brats"
    for i in range(4):
        _sequences(root, f"case{i}", ["T1", "flair"], seed=i, seg=False)
    rows = "".join(f"case{i}_{s}.nii.gz,{i % 2}\n" for i in range(4) for s in ("T1", "flair"))
    (root / "labels.csv").write_text("file,label\n" + rows)
    raw = load_source(cfg(root, dims=3, channels=["t1", "flair"]))
    assert len(raw.scans) == 4 and all(s.image.shape[0] == 2 for s in raw.scans)
    (root / "labels.csv").write_text("file,label\n" + rows.replace("case1_flair.nii.gz,1", "case1_flair.nii.gz,0"))
    with pytest.raises(InputError, match=r"case1_T1.nii.gz and case1_flair.nii.gz are sequences of one scan with different labels"):
        load_source(cfg(root, dims=3, channels=["t1", "flair"]))


def test_sequences_of_different_grids_are_refused(tmp_path):
    root = tmp_path / "brats"
    for i in range(2):
        volume(root / f"c{i}_t1.nii.gz", (10, 12, 8), seed=i)
        volume(root / f"c{i}_t2.nii.gz", (10, 12, 9 if i else 8), seed=i + 5)
    (root / "labels.csv").write_text("file,label\nc0_t1.nii.gz,0\nc1_t1.nii.gz,1\n")
    with pytest.raises(InputError, match="c1_t1.nii.gz: sequence 't2'.*share one grid"):
        load_source(cfg(root, dims=3, channels=["t1", "t2"]))


def test_labels_csv_may_name_links_but_not_paths_outside_the_folder(tmp_path):
    """A folder of links to scans kept elsewhere is read; a row that climbs out of it is refused."""
    store, root = tmp_path / "store", tmp_path / "links"
    root.mkdir()
    for i in range(4):
        volume(store / f"v{i}.nii.gz", (10, 12, 8), seed=i)
        (root / f"v{i}.nii.gz").symlink_to(store / f"v{i}.nii.gz")
    (root / "labels.csv").write_text("file,label\n" + "".join(f"v{i}.nii.gz,{i % 2}\n" for i in range(4)))
    assert len(load_source(cfg(root, dims=3)).scans) == 4
    (root / "labels.csv").write_text("file,label\n../store/v0.nii.gz,0\n" + "".join(f"v{i}.nii.gz,{i % 2}\n" for i in range(1, 4)))
    with pytest.raises(InputError, match=r"file '../store/v0.nii.gz' lies outside"):
        load_source(cfg(root, dims=3))
