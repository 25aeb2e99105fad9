"""Nearest-neighbour memorisation and the privacy gate: exact NCC, and a memorising generator caught."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from raysynth.quality.memorisation import nearest_feature, nearest_ncc, privacy_gate


def _smooth_images(n: int, size: int, seed: int, dims: int = 2) -> np.ndarray:
    """Independent smooth random fields in [-1, 1]: image-like, but no two alike."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.normal(size=(n,) + (size,) * dims), sigma=(0,) + (1.5,) * dims)
    return np.tanh(x / x.std()).astype(np.float32)


@pytest.mark.parametrize("dims", [2, 3])
def test_ncc_is_one_for_affine_intensity_copies(dims):
    real = _smooth_images(12, 8 if dims == 3 else 16, 0, dims)
    picks = np.array([7, 2, 11])
    synthetic = real[picks] * np.array([0.5, 2.0, 0.1]).reshape((3,) + (1,) * dims) + 0.3
    best, index = nearest_ncc(synthetic, real)
    assert best.shape == (3,) and best.dtype == np.float64 and index.dtype == np.int64
    np.testing.assert_allclose(best, 1.0, atol=1e-5)
    np.testing.assert_array_equal(index, picks)


def test_ncc_inverted_copy_is_minus_one_and_constant_is_zero():
    real = _smooth_images(1, 16, 1)
    best, _ = nearest_ncc(np.stack([-real[0], np.full((16, 16), 0.4, np.float32)]), real)
    np.testing.assert_allclose(best, [-1.0, 0.0], atol=1e-5)


def test_ncc_matches_pearson_and_chunking_does_not_matter():
    real, synthetic = _smooth_images(9, 16, 2), _smooth_images(7, 16, 3)
    best, index = nearest_ncc(synthetic, real, chunk_size=2)
    pearson = np.corrcoef(synthetic.reshape(7, -1), real.reshape(9, -1))[:7, 7:]
    np.testing.assert_allclose(best, pearson.max(1), atol=1e-5)
    np.testing.assert_array_equal(index, pearson.argmax(1))
    best_one, index_one = nearest_ncc(synthetic, real, chunk_size=1000)
    np.testing.assert_allclose(best, best_one, atol=1e-6)
    np.testing.assert_array_equal(index, index_one)


@pytest.mark.parametrize("call", [
    lambda: nearest_ncc(np.zeros((2, 8, 8)), np.zeros((2, 8, 9))),
    lambda: nearest_ncc(np.zeros((2, 8, 8)), np.zeros((0, 8, 8))),
    lambda: nearest_ncc(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), chunk_size=0),
    lambda: nearest_feature(np.zeros((2, 3)), np.zeros((2, 4))),
    lambda: nearest_feature(np.zeros((2, 3)), np.zeros((2, 3)), metric="manhattan"),
    lambda: privacy_gate(np.zeros(3), threshold=0.0),
    lambda: privacy_gate(np.zeros(3), threshold=1.5),
    lambda: privacy_gate(np.zeros(3), max_fraction=-0.1),
    lambda: privacy_gate(np.zeros((3, 1))),
    lambda: privacy_gate(np.array([0.5, np.nan])),
])
def test_invalid_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


def test_nearest_feature_cosine_and_l2():
    real = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    synth = np.array([[10.0, 0.1], [2.9, 3.2]])
    sim, idx = nearest_feature(synth, real, "cosine")
    np.testing.assert_array_equal(idx, [0, 2])
    assert sim[0] == pytest.approx(10 / np.hypot(10, 0.1))
    dist, idx = nearest_feature(synth, real, "l2")
    np.testing.assert_array_equal(idx, [2, 2])
    assert dist[1] == pytest.approx(np.hypot(0.1, 0.2))


def test_nearest_feature_matches_brute_force():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(40, 16)) * rng.uniform(0.1, 10, size=(40, 1))
    real[5] = 0.0  # a zero vector: cosine similarity 0 with anything
    synth = np.concatenate([rng.normal(size=(25, 16)), 3.0 * real[[3, 17]], np.zeros((1, 16))])
    sim, idx = nearest_feature(synth, real, "cosine")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = unit(synth) @ unit(real).T
    np.testing.assert_array_equal(idx, cos.argmax(1))
    np.testing.assert_allclose(sim, cos.max(1), atol=1e-12)
    assert sim[25:27] == pytest.approx(1.0) and list(idx[25:27]) == [3, 17] and sim[27] == 0.0
    dist, idx = nearest_feature(synth, real, "l2")
    full = np.linalg.norm(synth[:, None] - real[None], axis=-1)
    np.testing.assert_array_equal(idx, full.argmin(1))
    np.testing.assert_allclose(dist, full.min(1), rtol=1e-9, atol=1e-7)
    assert dist.dtype == np.float64 and idx.dtype == np.int64
    empty = nearest_feature(np.zeros((0, 16)), real)
    assert empty[0].shape == empty[1].shape == (0,)


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_ncc_of_multichannel_images_correlates_all_channels_together(spatial):
    real = np.stack([_smooth_images(10, spatial[0], 20 + c, len(spatial)) for c in range(3)], axis=1)  # (N, C, *S)
    synthetic = np.concatenate([0.5 * real[[4, 8]] - 0.2, _smooth_images(6, spatial[0], 30, len(spatial))
                                .reshape(2, 3, *spatial), np.roll(real[[1]], 1, axis=1)])  # copies, new, channels rotated
    best, index = nearest_ncc(synthetic, real, chunk_size=3)
    pearson = np.corrcoef(synthetic.reshape(5, -1), real.reshape(10, -1))[:5, 5:]
    np.testing.assert_allclose(best, pearson.max(1), atol=1e-5)
    np.testing.assert_array_equal(index, pearson.argmax(1))
    np.testing.assert_allclose(best[:2], 1.0, atol=1e-5)
    assert list(index[:2]) == [4, 8] and best[2:].max() < 0.5  # rotated channels are not a copy
    with pytest.raises(ValueError, match="shapes differ"):
        nearest_ncc(synthetic[:, :2], real)


def test_gate_counts_strictly_above_threshold_and_orders_closest_first():
    ncc = np.array([0.2, 0.96, 0.95, 0.99, 0.5])
    gate = privacy_gate(ncc, threshold=0.95, max_fraction=0.4)
    assert gate["count"] == 2 and gate["total"] == 5 and gate["fraction"] == pytest.approx(0.4)
    assert gate["passed"]  # exactly at the limit is allowed ("at most")
    assert gate["offending_indices"] == [3, 1]
    assert not privacy_gate(ncc, threshold=0.95, max_fraction=0.39)["passed"]
    assert privacy_gate(np.zeros(0))["passed"]


def test_gate_catches_a_memorising_generator_and_passes_an_honest_one():
    training = _smooth_images(40, 16, 4)
    rng = np.random.default_rng(5)
    # A generator that returns its training images, barely perturbed.
    picks = rng.integers(0, len(training), size=30)
    memorised = training[picks] + 0.02 * rng.normal(size=(30, 16, 16)).astype(np.float32)
    best, index = nearest_ncc(memorised, training)
    gate = privacy_gate(best, threshold=0.95, max_fraction=0.01)
    assert not gate["passed"] and gate["count"] == 30
    np.testing.assert_array_equal(index, picks)
    # A generator that draws new images from the same distribution.
    honest, _ = nearest_ncc(_smooth_images(30, 16, 6), training)
    gate = privacy_gate(honest, threshold=0.95, max_fraction=0.01)
    assert gate["passed"] and gate["count"] == 0 and honest.max() < 0.9


def test_gate_allows_the_held_out_real_rate_and_catches_an_excess():
    # 2% of samples above the threshold: a memoriser when real scans never cross it, a faithful
    # generator when 1.5% of held-out real scans cross it too (excess 0.5% <= 1%).
    ncc = np.r_[np.full(98, 0.5), 0.99, 0.99]
    assert not privacy_gate(ncc, 0.9, 0.01)["passed"]
    gate = privacy_gate(ncc, 0.9, 0.01, reference_fraction=0.015)
    assert gate["passed"] and gate["excess"] == pytest.approx(0.005) and gate["reference_fraction"] == 0.015
    assert not privacy_gate(ncc, 0.9, 0.005, reference_fraction=0.01)["passed"]  # 1% excess > 0.5%
    with pytest.raises(ValueError, match="reference_fraction"):
        privacy_gate(ncc, 0.9, 0.01, reference_fraction=1.5)
