"""``data.duplicates``: duplicate groups become one subject (``group``), lose all but one image
(``drop``), or stay as they are (``keep``); a group filed under two labels is an error under ``group``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from raysynth.config import load_config
from raysynth.data.sources import load_source
from raysynth.data.subjects import group_duplicates
from raysynth.errors import InputError


def _picture(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((24, 24)) * 200 + 20).astype(np.uint8)).save(path)


def _folder(root, conflict=False):
    """Classes a, b of 4 distinct pictures each; a0 is copied to a/copy.png (mirrored), and with
    ``conflict`` a1 is refiled as b/refiled.png."""
    for i in range(4):
        _picture(root / "a" / f"a{i}.png", i)
        _picture(root / "b" / f"b{i}.png", 100 + i)
    Image.open(root / "a" / "a0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "a" / "copy.png")
    if conflict:
        (root / "b" / "refiled.png").write_bytes((root / "a" / "a1.png").read_bytes())
    return load_source(load_config("smoke", overrides=[f"data.source={root}"]).data)


def _subject(raw, name):
    return next(s.subject for s in raw.scans if s.source == name)


def test_group_makes_each_group_one_subject(tmp_path):
    raw = _folder(tmp_path / "d")
    assert _subject(raw, "a/a0.png") != _subject(raw, "a/copy.png")
    grouped, summary = group_duplicates(raw, "group", 0.97)
    assert _subject(grouped, "a/a0.png") == _subject(grouped, "a/copy.png")
    assert len({s.subject for s in grouped.scans}) == len(raw.scans) - 1
    assert (summary["num_groups"], summary["num_grouped_images"], summary["threshold"]) == (1, 2, 0.97)


def test_drop_keeps_one_image_per_group(tmp_path, caplog):
    raw = _folder(tmp_path / "d")
    with caplog.at_level(logging.WARNING):
        dropped, summary = group_duplicates(raw, "drop", 0.97)
    assert [s.source for s in dropped.scans if s.source in ("a/a0.png", "a/copy.png")] == ["a/a0.png"]
    assert summary["num_dropped"] == 1 and "dropped 1 duplicate" in caplog.text


def test_keep_warns_and_changes_nothing(tmp_path, caplog):
    raw = _folder(tmp_path / "d")
    with caplog.at_level(logging.WARNING):
        kept, _ = group_duplicates(raw, "keep", 0.97)
    assert kept is raw and "data.duplicates=keep" in caplog.text


def test_conflicting_labels_error_under_group_and_drop_the_group_under_drop(tmp_path, caplog):
    raw = _folder(tmp_path / "d", conflict=True)
    with pytest.raises(InputError, match=r"a/a1.png \('a'\) and b/refiled.png \('b'\)"):
        group_duplicates(raw, "group", 0.97)
    with caplog.at_level(logging.WARNING):
        dropped, summary = group_duplicates(raw, "drop", 0.97)
    assert not {"a/a1.png", "b/refiled.png"} & {s.source for s in dropped.scans}
    assert summary["num_conflicting_groups"] == 1 and "different labels" in caplog.text
    kept, _ = group_duplicates(raw, "keep", 0.97)
    assert kept is raw


def test_mixed_lesion_labels_are_grouped_for_segmentation(tmp_path):
    """A segmentation label is derived from the mask, so near-identical neighbour slices may differ in
    it: grouped into one subject, not refused (found on brain-mri-seg2d: TCGA_CS_4941 slices 16 and 19)."""
    raw = _folder(tmp_path / "d", conflict=True)
    grouped, summary = group_duplicates(raw, "group", 0.97, labels_from_masks=True)
    assert _subject(grouped, "a/a1.png") == _subject(grouped, "b/refiled.png")
    assert summary["num_conflicting_groups"] == 0 and summary["num_mixed_lesion_groups"] == 1
    dropped, _ = group_duplicates(raw, "drop", 0.97, labels_from_masks=True)
    assert len([s for s in dropped.scans if s.source in ("a/a1.png", "b/refiled.png")]) == 1


def test_distinct_pictures_are_not_grouped(tmp_path):
    root = tmp_path / "d"
    for i in range(4):
        _picture(root / "a" / f"a{i}.png", i)
        _picture(root / "b" / f"b{i}.png", 100 + i)
    raw = load_source(load_config("smoke", overrides=[f"data.source={root}"]).data)
    out, summary = group_duplicates(raw, "group", 0.97)
    assert summary["num_groups"] == 0 and out is raw
