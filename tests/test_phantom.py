"""The embedded cohort: shapes, determinism, lesions, masks that move with the image, the cache."""

from __future__ import annotations

import numpy as np
import pytest

from raysynth.data import phantom
from raysynth.data.phantom import CLASS_NAMES, LESION, TISSUE_NAMES, lesion_labels, make_cohort, native_geometry


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSYNTH_CACHE", str(tmp_path / "cache"))


def _arrays(raw):
    return np.stack([s.image[0] for s in raw.scans]), np.stack([s.mask for s in raw.scans])


@pytest.mark.parametrize(
    "dims, image_size, num_scans",
    [(2, 16, 12), (2, 32, 8), (3, 16, 6)],
)
def test_shapes_types_and_units(dims, image_size, num_scans):
    raw = make_cohort(num_scans, image_size, dims, use_cache=False)
    geo = native_geometry(image_size, dims)
    assert all(s.image.shape == (1, *geo.shape) for s in raw.scans)  # one channel, always explicit
    images, masks = _arrays(raw)
    assert images.shape == (num_scans, *geo.shape) and images.dtype == np.float32
    assert masks.shape == images.shape and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= set(range(len(TISSUE_NAMES)))
    # Native grid a little above the target, and not yet normalised: integer scanner units.
    assert 1.4 * image_size <= max(geo.shape) <= (64 if dims == 3 else 2 * image_size)
    assert images.min() >= 0 and images.max() > 200 and np.all(images == np.round(images))
    assert [s.id for s in raw.scans] == [f"s{i:04d}" for i in range(num_scans)]
    assert raw.class_names == CLASS_NAMES and raw.mask_names == TISSUE_NAMES and raw.kind == "phantom"
    assert all(s.spacing == (geo.voxel_mm,) * dims for s in raw.scans)
    assert set(raw.labels.tolist()) == {0, 1}


def test_deterministic_and_independent_of_cohort_size():
    a, b = make_cohort(10, 16, 2, use_cache=False), make_cohort(20, 16, 2, use_cache=False)
    again = make_cohort(10, 16, 2, use_cache=False)
    for i in range(10):
        np.testing.assert_array_equal(a.scans[i].image, b.scans[i].image)
        np.testing.assert_array_equal(a.scans[i].mask, b.scans[i].mask)
        np.testing.assert_array_equal(a.scans[i].image, again.scans[i].image)
        assert a.scans[i].label == b.scans[i].label
    other = make_cohort(10, 16, 2, seed=1, use_cache=False)
    assert not np.array_equal(_arrays(a)[0], _arrays(other)[0])


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_lesion_fraction_holds_for_every_prefix(fraction):
    labels = lesion_labels(557, fraction, seed=3)
    counts = np.cumsum(labels)
    n = np.arange(1, 558)
    assert np.all(np.abs(counts - n * fraction) < 3.0)  # tiny cohorts still get both classes
    assert not np.array_equal(labels, lesion_labels(557, fraction, seed=4))


@pytest.mark.parametrize("dims, image_size", [(2, 16), (2, 64), (3, 16)])
def test_lesion_lies_in_the_scan_exactly_when_labelled(dims, image_size):
    raw = make_cohort(8, image_size, dims, use_cache=False)
    for scan in raw.scans:
        lesion = scan.mask == LESION
        assert lesion.any() == bool(scan.label), scan.id
        if scan.label:  # a blob that differs from the white matter around it, inside the brain
            white = scan.image[0][scan.mask == 3].mean()
            assert abs(scan.image[0][lesion].mean() / white - 1.0) > 0.1
            assert lesion.sum() >= 4


def test_masks_move_with_their_images():
    raw = make_cohort(6, 32, 2, use_cache=False)
    images, masks = _arrays(raw)
    assert not np.array_equal(masks[0], masks[1])  # each scan is deformed differently

    def fit(image, mask):  # how much of the image a piecewise-constant tissue model explains
        model = np.zeros_like(image)
        for k in np.unique(mask):
            model[mask == k] = image[mask == k].mean()
        return np.corrcoef(model.ravel(), image.ravel())[0, 1]

    for i in range(len(images)):
        own, other = fit(images[i], masks[i]), fit(images[i], masks[(i + 1) % len(images)])
        assert own > 0.85 and own > other + 0.03
        means = [images[i][masks[i] == k].mean() for k in (1, 2, 3)]
        assert means[0] < means[1] < means[2]  # T1: CSF < grey < white


def test_cache_hit_and_key(tmp_path, monkeypatch):
    first = make_cohort(6, 16, 2)
    files = list((tmp_path / "cache").glob("phantom-2d-*.npz"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".*tmp"))

    def no_build(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(phantom, "_build", no_build)
    second = make_cohort(6, 16, 2)
    np.testing.assert_array_equal(_arrays(first)[0], _arrays(second)[0])
    np.testing.assert_array_equal(_arrays(first)[1], _arrays(second)[1])
    with pytest.raises(AssertionError, match="cache miss"):  # another parameter, another key
        make_cohort(6, 16, 2, lesion_fraction=0.3)


def test_damaged_cache_is_rebuilt(tmp_path):
    first = make_cohort(5, 16, 2)
    (path,) = (tmp_path / "cache").glob("phantom-*.npz")
    path.write_bytes(b"not an npz")
    again = make_cohort(5, 16, 2)
    np.testing.assert_array_equal(_arrays(first)[0], _arrays(again)[0])


def test_shifted_scanner_is_another_stream():
    base, shifted = make_cohort(6, 32, 2, use_cache=False), make_cohort(6, 32, 2, shifted=True, use_cache=False)
    assert shifted.kind == "phantom-shifted" and shifted.scans[0].id == "x0000"
    assert shifted.scans[0].image.shape != base.scans[0].image.shape  # a coarser acquisition
    assert shifted.scans[0].spacing[0] > base.scans[0].spacing[0]
    # Flatter contrast: a smaller white/grey ratio than the default scanner.
    ratio = [np.mean([s.image[0][s.mask == 3].mean() / s.image[0][s.mask == 2].mean() for s in r.scans])
             for r in (base, shifted)]
    assert ratio[1] < ratio[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_scans=0, image_size=16, dims=2), "num_scans"),
        (dict(num_scans=4, image_size=16, dims=4), "dims"),
        (dict(num_scans=4, image_size=4, dims=2), "image_size"),
        (dict(num_scans=4, image_size=16, dims=2, lesion_fraction=1.0), "lesion_fraction"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cohort(**kwargs, use_cache=False)
