"""Real folders as researchers have them: subjects from file names, subjects.csv or labels.csv, flat
segmentation folders, extra columns, and the one-line errors for what cannot be used."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raysynth.config import load_config
from raysynth.data.sources import load_source
from raysynth.errors import InputError


def cfg(source, *overrides):
    return load_config("smoke", overrides=[f"data.source={source}", *overrides]).data


def picture(path, seed, size=24, lesion=False):
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size)) * 200 + 20).astype(np.uint8)
    Image.fromarray(img).save(path)
    mask = np.zeros((size, size), np.uint8)
    if lesion:
        mask[8:14, 8:14] = 255
    return mask


def flat_folder(root, patients=("TCGA_AB_0001", "TCGA_AB_0002", "TCGA_CD_0003"), slices=4):
    root.mkdir()
    for p, patient in enumerate(patients):
        for z in range(slices):
            name = f"{patient}_20000101_{z + 1}"
            mask = picture(root / f"{name}.png", 10 * p + z, lesion=z % 2 == 1)
            Image.fromarray(mask).save(root / f"{name}_seg.png")
    return root


def test_flat_segmentation_folder_with_subjects_from_the_file_name(tmp_path):
    root = flat_folder(tmp_path / "flat")
    raw = load_source(cfg(root, "data.task=segmentation", "data.subject_pattern=^(TCGA_[A-Z]{2}_[0-9]{4})"))
    assert raw.class_names == ["no_lesion", "lesion"] and len(raw.scans) == 12
    assert [s.label for s in raw.scans if s.source.endswith("_2.png")] == [1, 1, 1]  # odd slices carry a lesion
    by_subject = {}
    for s in raw.scans:
        by_subject.setdefault(s.subject, set()).add(s.source.split("_2000")[0])
    assert len(by_subject) == 3 and all(len(v) == 1 for v in by_subject.values())
    assert all(s.subject.startswith("p") and "TCGA" not in s.subject for s in raw.scans)  # names stay behind


def test_without_a_pattern_every_file_is_its_own_subject(tmp_path):
    raw = load_source(cfg(flat_folder(tmp_path / "flat"), "data.task=segmentation"))
    assert len({s.subject for s in raw.scans}) == 12


def test_a_pattern_that_matches_nothing_names_a_file(tmp_path):
    root = flat_folder(tmp_path / "flat")
    with pytest.raises(InputError, match=r"matches no file name .*TCGA_AB_0001_20000101_1\.png"):
        load_source(cfg(root, "data.task=segmentation", "data.subject_pattern=^(IXI[0-9]+)"))
    with pytest.raises(InputError, match="matches 8 of 12 file names"):
        load_source(cfg(root, "data.task=segmentation", "data.subject_pattern=^(TCGA_AB_[0-9]{4})"))


def test_a_flat_folder_without_segmentation_is_refused(tmp_path):
    with pytest.raises(InputError, match="needs data.task=segmentation"):
        load_source(cfg(flat_folder(tmp_path / "flat")))


def test_a_flat_folder_whose_masks_are_all_empty_is_refused(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(4):
        Image.fromarray(picture(root / f"x{i}.png", i)).save(root / f"x{i}_seg.png")
    with pytest.raises(InputError, match="every mask .* is empty"):
        load_source(cfg(root, "data.task=segmentation"))


def test_subjects_csv_groups_files(tmp_path):
    root = tmp_path / "classes"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            picture(root / c / f"{c}{i}.png", ord(c) * 10 + i)
    rows = ["file,subject"] + [f"{c}/{c}{i}.png,patient-{c}{i // 2}" for c in "ab" for i in range(3)]
    (root / "subjects.csv").write_text("\n".join(rows) + "\n")
    raw = load_source(cfg(root))
    assert len({s.subject for s in raw.scans}) == 4  # a0 a1 | a2, b0 b1 | b2
    (root / "subjects.csv").write_text("file,subject\na/a0.png,x\n")
    with pytest.raises(InputError, match="no subject for 'a/a1.png'"):
        load_source(cfg(root))
    (root / "subjects.csv").write_text("file,patient\na/a0.png,x\n")
    with pytest.raises(InputError, match="needs the columns file,subject"):
        load_source(cfg(root))


def test_labels_csv_with_extra_columns_and_a_subject_column(tmp_path):
    root = tmp_path / "csv"
    root.mkdir()
    rows = ["file,label,subject,modality,age"]
    for i in range(6):
        picture(root / f"x{i}.png", i)
        rows.append(f"x{i}.png,{'ab'[i % 2]},subj{i // 2},T1,{40 + i}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    raw = load_source(cfg(root))
    assert raw.class_names == ["a", "b"] and len({s.subject for s in raw.scans}) == 3
    rows[3] = "x2.png,a,,T1,42"
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(InputError, match="empty subject for 'x2.png'"):
        load_source(cfg(root))


def test_a_mask_of_another_size_is_a_one_line_error(tmp_path):
    root = flat_folder(tmp_path / "flat")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "TCGA_AB_0001_20000101_1_seg.png")
    with pytest.raises(InputError, match="mask shape .* differs"):
        load_source(cfg(root, "data.task=segmentation"))


def test_a_mask_that_is_not_a_label_map_is_a_one_line_error(tmp_path):
    root = flat_folder(tmp_path / "flat")
    Image.fromarray(np.full((24, 24), 100, np.uint8)).save(root / "TCGA_AB_0001_20000101_1_seg.png")
    with pytest.raises(InputError, match="mask labels"):
        load_source(cfg(root, "data.task=segmentation"))
