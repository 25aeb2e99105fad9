"""Preprocessing: one size, one spacing, robust intensities in [-1, 1], masks that stay labels."""

from __future__ import annotations

import numpy as np
import pytest

from raysynth.config import DataConfig
from raysynth.data.phantom import make_cohort
from raysynth.data.preprocess import centre_pad_crop, normalise_intensity, preprocess
from raysynth.data.raw import RawScan, RawSet
from raysynth.errors import InputError


def rawset(arrays, spacings=None, masks=None, labels=None, channels=False) -> RawSet:
    """Raw scans of spatial arrays (a channel axis is added), or of ``(C, *S)`` arrays with ``channels``."""
    arrays = [np.asarray(a, np.float32) if channels else np.asarray(a, np.float32)[None] for a in arrays]
    scans = [
        RawScan(id=f"s{i:04d}", subject=f"s{i:04d}", label=(labels or [i % 2] * len(arrays))[i],
                image=a, mask=None if masks is None else masks[i],
                spacing=spacings[i] if spacings else (1.0,) * (np.ndim(a) - 1))
        for i, a in enumerate(arrays)
    ]
    return RawSet(scans=scans, class_names=["a", "b"], mask_names=["background", "fg"] if masks else None,
                  kind="images")


def noise(shape, seed=0, scale=1000.0):
    return np.random.default_rng(seed).random(shape).astype(np.float32) * scale + 5.0


@pytest.mark.parametrize(
    "dims, size, shapes",
    [
        (2, 16, [(20, 14), (9, 31), (16, 16)]),
        (2, 8, [(40, 40), (3, 5)]),
        (3, 16, [(10, 12, 8), (20, 6, 9)]),
        (3, 8, [(4, 4, 4), (30, 30, 30)]),
    ],
)
def test_shapes_types_and_range(dims, size, shapes):
    out = preprocess(rawset([noise(s, i) for i, s in enumerate(shapes)]), DataConfig(dims=dims, image_size=size))
    assert out.images.shape == (len(shapes), 1, *(size,) * dims) and out.images.dtype == np.float32
    assert out.images.min() >= -1.0 and out.images.max() <= 1.0 and out.masks is None
    assert out.ids == [f"s{i:04d}" for i in range(len(shapes))] and out.labels.dtype == np.int64
    assert len(out.spacing) == dims


def test_robust_normalisation_clips_outliers():
    image = np.linspace(0.0, 100.0, 10000, dtype=np.float32).reshape(100, 100)
    image[0, 0] = 1e6  # one hot voxel must not squash the rest
    out = normalise_intensity(image, 1.0, 99.0)
    assert out.dtype == np.float32 and out.min() == -1.0 and out.max() == 1.0
    assert abs(float(np.median(out))) < 0.02
    assert (out == 1.0).mean() == pytest.approx(0.01, abs=0.002)
    sparse = np.zeros((50, 50), np.float32)
    sparse[0, 0] = 3.0  # every percentile is 0: fall back to the full range instead of dividing by zero
    assert normalise_intensity(sparse, 0.5, 99.5).max() == 1.0


def test_2d_keeps_aspect_ratio_by_padding():
    wide = noise((10, 30))
    out = preprocess(rawset([wide, noise((30, 30), 1)]), DataConfig(image_size=12))
    image = out.images[0, 0]
    assert np.allclose(image[:3], -1.0) and np.allclose(image[-3:], -1.0)  # rows 0-2 and 9-11 are padding
    assert (image[4:8] > -1.0).mean() > 0.9


def test_2d_anisotropic_pixels_become_square():
    # 10 rows of 3 mm and 30 columns of 1 mm: a 30 x 30 mm square, no padding needed.
    raw = rawset([noise((10, 30)), noise((10, 30), 1)], spacings=[(3.0, 1.0)] * 2)
    out = preprocess(raw, DataConfig(image_size=12))
    assert (out.images[0, 0] > -1.0).mean() > 0.9
    assert out.spacing == pytest.approx((2.5, 2.5))


def test_3d_common_spacing_keeps_physical_scale():
    small, big = noise((8, 8, 8)), noise((16, 16, 16), 1)  # the same grid size, FOV 16 mm and 32 mm
    out = preprocess(rawset([small, big], spacings=[(2.0,) * 3, (2.0,) * 3]), DataConfig(dims=3, image_size=16))
    assert out.spacing == pytest.approx((2.0, 2.0, 2.0))  # largest FOV (32 mm) over 16 voxels
    occupied = [(img > -1.0).mean() for img in out.images]
    assert occupied[1] > 0.9 and occupied[0] == pytest.approx(1 / 8, abs=0.03)


def test_masks_resized_nearest_for_segmentation():
    mask = np.zeros((20, 14), np.uint8)
    mask[5:15, 3:9] = 2
    mask[8:10, 4:6] = 1
    raw = rawset([noise((20, 14)), noise((20, 14), 1)], masks=[mask, mask])
    seg = preprocess(raw, DataConfig(image_size=16, task="segmentation"))
    assert seg.masks.shape == (2, 16, 16) and seg.masks.dtype == np.uint8
    assert set(np.unique(seg.masks)) == {0, 1, 2}
    assert preprocess(raw, DataConfig(image_size=16)).masks is None  # classification drops masks


@pytest.mark.parametrize("method", ["gaussian", "median"])
def test_denoise_reduces_noise(method):
    rng = np.random.default_rng(0)
    clean = np.zeros((32, 32), np.float32)
    clean[8:24, 8:24] = 100.0
    noisy = clean + rng.normal(0, 10, clean.shape).astype(np.float32)
    raw = rawset([noisy, noisy])
    plain = preprocess(raw, DataConfig(image_size=32, low_percentile=0.0, high_percentile=100.0))
    smooth = preprocess(raw, DataConfig(image_size=32, denoise=method, denoise_sigma=1.0,
                                        low_percentile=0.0, high_percentile=100.0))
    inside = (slice(10, 22), slice(10, 22))
    assert smooth.images[0, 0][inside].std() < 0.7 * plain.images[0, 0][inside].std()


def test_foreground_crop_enlarges_the_object():
    vol = np.zeros((40, 40, 40), np.float32)
    vol[15:25, 15:25, 15:25] = 500.0
    vol += np.random.default_rng(0).random(vol.shape).astype(np.float32)
    raw = rawset([vol, vol.copy()], spacings=[(1.0,) * 3] * 2)
    plain = preprocess(raw, DataConfig(dims=3, image_size=16))
    cropped = preprocess(raw, DataConfig(dims=3, image_size=16, foreground_crop=True))
    assert (cropped.images[0, 0] > 0).mean() > 3 * (plain.images[0, 0] > 0).mean()


def test_phantom_lesions_survive_preprocessing(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSYNTH_CACHE", str(tmp_path))
    for dims, size in [(2, 16), (3, 16)]:
        raw = make_cohort(6, size, dims, use_cache=False)
        out = preprocess(raw, DataConfig(dims=dims, image_size=size, task="segmentation"))
        assert out.images.shape == (6, 1, *(size,) * dims) and out.masks.shape == (6, *(size,) * dims)
        has_lesion = [(m == 4).any() for m in out.masks]
        assert has_lesion == [bool(y) for y in out.labels]


@pytest.mark.parametrize("dims, shape", [(2, (16, 16)), (3, (16, 16, 16))])
def test_channels_are_normalised_each_on_its_own_with_one_geometry(dims, shape):
    """Three sequences of very different scales: each maps to [-1, 1] by its own percentiles, and
    all share the resampling (the same structure lands on the same voxels)."""
    base = noise(shape, 0, scale=1.0)
    scan = np.stack([base * 1000.0, base * 3.0 + 7.0, -base * 50.0])  # T1-like, FLAIR-like, inverted
    mask = (base > 0.5).astype(np.uint8)
    raw = rawset([scan, scan * 2.0], channels=True, masks=[mask, mask], spacings=[(1.0,) * dims] * 2)
    out = preprocess(raw, DataConfig(dims=dims, image_size=8, task="segmentation", low_percentile=0.0,
                                     high_percentile=100.0))
    assert out.images.shape == (2, 3, *(8,) * dims) and out.masks.shape == (2, *(8,) * dims)
    assert out.num_channels == 3 and out.spatial_shape == (8,) * dims
    np.testing.assert_allclose(out.images[0, 0], out.images[0, 1], atol=1e-5)  # same content after per-channel scaling
    np.testing.assert_allclose(out.images[0, 2], -out.images[0, 0], atol=1e-4)  # (no padding: square grids)
    for c in range(3):
        assert out.images[0, c].min() < -0.1 and out.images[0, c].max() > 0.1  # centred, not one-sided


def test_foreground_crop_uses_the_union_of_channels():
    a = np.zeros((40, 40), np.float32)
    b = np.zeros((40, 40), np.float32)
    a[5:12, 5:12] = 500.0  # the object is in channel 0 at one corner, in channel 1 at the other
    b[28:35, 28:35] = 500.0
    scan = np.stack([a, b]) + np.random.default_rng(0).random((2, 40, 40)).astype(np.float32)
    out = preprocess(rawset([scan, scan.copy()], channels=True), DataConfig(image_size=16, foreground_crop=True))
    assert out.images.shape == (2, 2, 16, 16)
    assert (out.images[0, 0] > 0).any() and (out.images[0, 1] > 0).any()  # neither object cropped away


def test_scans_of_different_channel_counts_are_an_input_error():
    raw = rawset([np.stack([noise((8, 8))] * 3), noise((8, 8), 1)[None]], channels=True)
    with pytest.raises(InputError, match="1 channels where s0000 has 3"):
        preprocess(raw, DataConfig(image_size=8))


def test_dimension_mismatch_and_missing_mask_are_input_errors():
    with pytest.raises(InputError, match="s0000.*dims=3"):
        preprocess(rawset([noise((8, 8))]), DataConfig(dims=3, image_size=8))
    with pytest.raises(InputError, match="no mask"):
        preprocess(rawset([noise((8, 8))]), DataConfig(image_size=8, task="segmentation"))
    with pytest.raises(ValueError, match="denoise"):
        preprocess(rawset([noise((8, 8))]), DataConfig(image_size=8, denoise="wavelet"))


@pytest.mark.parametrize(
    "shape, target", [((5, 8), (8, 5)), ((9, 4), (4, 9)), ((7, 7), (3, 3)), ((4, 5, 6), (2, 7, 3))]
)
def test_centre_pad_crop_places_like_monai(shape, target):
    from monai.transforms import ResizeWithPadOrCrop

    x = np.random.default_rng(0).random(shape).astype(np.float32)
    expected = np.asarray(ResizeWithPadOrCrop(target, value=-1.0)(x[None]))[0]
    np.testing.assert_array_equal(centre_pad_crop(x, target, -1.0), expected)
