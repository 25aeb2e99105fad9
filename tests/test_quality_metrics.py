"""Known-answer tests of the fidelity, coverage and diversity metrics (tiny sizes, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from raysynth.quality.features import random_encoder, train_encoder
from raysynth.quality.metrics import (effective_k, frechet_distance, kid, ms_ssim_diversity, precision_recall,
                                      ssim_settings)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core box they oversubscribe it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def _smooth_images(n: int, size: int, seed: int, dims: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.normal(size=(n,) + (size,) * dims), sigma=(0,) + (1.5,) * dims)
    return np.tanh(x / x.std()).astype(np.float32)[:, None]  # (N, 1, *S): the channel axis is explicit


# ---- Fréchet distance -------------------------------------------------------------------------

@pytest.mark.parametrize("covariance", ["sample", "ledoit_wolf", "auto"])
def test_fd_identical_sets_is_zero(covariance):
    f = _gauss(100, 8, 0)
    assert frechet_distance(f, f, covariance=covariance) == pytest.approx(0.0, abs=1e-6)


def test_fd_translated_set_is_the_squared_shift():
    # Equal covariances, so the trace term cancels and FD = ||c||^2 exactly.
    f = _gauss(200, 6, 1)
    c = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    assert frechet_distance(f, f + c, covariance="sample") == pytest.approx(float(c @ c), rel=1e-6)


def test_fd_large_for_disjoint_small_for_same_distribution():
    same = frechet_distance(_gauss(300, 8, 2), _gauss(300, 8, 3))
    disjoint = frechet_distance(_gauss(300, 8, 2), _gauss(300, 8, 3, shift=5.0))
    assert disjoint == pytest.approx(8 * 25.0, rel=0.1)
    assert same < 0.5 and disjoint > 100 * same


def test_fd_fewer_samples_than_features_is_finite():
    # n < F makes the sample covariance singular; the shrinkage estimate keeps sqrtm well defined.
    f1, f2 = _gauss(10, 32, 4), _gauss(12, 32, 5)
    for covariance in ("auto", "ledoit_wolf", "sample"):
        value = frechet_distance(f1, f2, covariance=covariance)
        assert np.isfinite(value) and value > 0


def _fd_by_eigh(f1: np.ndarray, f2: np.ndarray, covariance: str) -> float:
    """FD from scratch: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all symmetric, no sqrtm."""
    from sklearn.covariance import LedoitWolf

    cov = (lambda f: LedoitWolf().fit(f).covariance_) if covariance == "ledoit_wolf" else (lambda f: np.cov(f, rowvar=False))
    s1, s2 = cov(f1), cov(f2)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    d = f1.mean(0) - f2.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum())


@pytest.mark.parametrize("n1, n2, d, covariance", [
    (300, 250, 8, "sample"), (300, 250, 8, "ledoit_wolf"), (20, 15, 64, "ledoit_wolf"),
    (2, 3, 16, "ledoit_wolf"), (10, 12, 32, "sample"),  # rank-deficient: n <= F
])
def test_fd_matches_an_independent_eigendecomposition(n1, n2, d, covariance):
    rng = np.random.default_rng(n1 + d)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    f1 = rng.normal(size=(n1, d)) @ a
    f2 = rng.normal(size=(n2, d)) @ (a + 0.1 * rng.normal(size=(d, d)) / np.sqrt(d)) + 0.2
    expected = _fd_by_eigh(f1, f2, covariance)
    assert expected > 0.1
    assert frechet_distance(f1, f2, covariance=covariance) == pytest.approx(expected, rel=1e-6)


# ---- KID --------------------------------------------------------------------------------------

def test_kid_same_distribution_near_zero_and_disjoint_large():
    a, b = _gauss(200, 8, 6), _gauss(200, 8, 7)
    same_mean, same_std = kid(a, b, subsets=20, subset_size=100, seed=0)
    far_mean, _ = kid(a, _gauss(200, 8, 7, shift=3.0), subsets=20, subset_size=100, seed=0)
    ident_mean, _ = kid(a, a, subsets=20, subset_size=100, seed=0)
    # Unbiased: one distribution scatters around 0 within its subset spread; a shift of 3 sigma is huge.
    assert abs(same_mean) < 2 * same_std and far_mean > 50
    assert abs(same_mean) < 1e-3 * far_mean and abs(ident_mean) < 1e-3 * far_mean


def test_kid_is_seeded():
    a, b = _gauss(50, 4, 8), _gauss(50, 4, 9)
    assert kid(a, b, 5, 20, seed=3) == kid(a, b, 5, 20, seed=3)


# ---- precision / recall -----------------------------------------------------------------------

def test_precision_recall_identical_sets_are_one():
    f = _gauss(60, 5, 10)
    assert precision_recall(f, f, k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_are_zero():
    p, r = precision_recall(_gauss(60, 5, 11), _gauss(60, 5, 12, shift=20.0), k=3)
    assert p == 0.0 and r == 0.0


def test_precision_recall_mode_collapse_keeps_precision_loses_recall():
    real = _gauss(200, 2, 13)
    fake = real[np.linalg.norm(real, axis=1) < 0.5]  # a generator that only produces the centre
    p, r = precision_recall(real, fake, k=3)
    assert p == 1.0 and r < 0.5


def test_precision_recall_small_n_reduces_k():
    assert effective_k(5, 3, 10) == 2
    p, r = precision_recall(_gauss(2, 3, 14), _gauss(2, 3, 14), k=5)
    assert (p, r) == (1.0, 1.0)


def _precision_recall_brute(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. by hand: all pairwise distances, radius = k-th smallest besides the point itself."""
    dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    r_real, r_fake = np.sort(dist(real, real), 1)[:, k], np.sort(dist(fake, fake), 1)[:, k]
    precision = np.mean(np.any(dist(fake, real) <= r_real[None, :], axis=1))
    recall = np.mean(np.any(dist(real, fake) <= r_fake[None, :], axis=1))
    return float(precision), float(recall)


@pytest.mark.parametrize("seed", range(12))
def test_precision_recall_matches_brute_force(seed):
    # Feature widths either side of 15 (where sklearn switches from a k-d tree to brute force).
    rng = np.random.default_rng(100 + seed)
    n_real, n_fake, d = int(rng.integers(10, 60)), int(rng.integers(10, 60)), int(rng.choice([2, 5, 16, 40]))
    real = rng.normal(size=(n_real, d))
    fake = rng.normal(size=(n_fake, d)) * rng.uniform(0.8, 1.2) + rng.normal(0, 0.3)
    k = effective_k(int(rng.integers(1, 8)), n_real, n_fake)
    p, r = precision_recall(real, fake, k=k)
    assert (p, r) == _precision_recall_brute(real, fake, k)
    assert 0 < p < 1 or 0 < r < 1  # a case with something to get wrong


@pytest.mark.parametrize("d", [4, 64])
def test_precision_recall_exact_copies_of_duplicated_points_are_inside(d):
    # Each real point twice, so k=1 gives radius 0: only an exact copy is inside, and it must be.
    real = np.repeat(_gauss(10, d, 19) * 7.3, 2, axis=0)
    copies = real[::2] + 0.0
    assert precision_recall(real, copies, k=1) == (1.0, 1.0)
    # ... and the balls have (next to) no size: sklearn's brute-force radii at high d carry ~1e-8 of round-off.
    assert precision_recall(real, copies + 1e-4, k=1)[0] == 0.0


# ---- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: frechet_distance(np.zeros((5, 3)), np.zeros((5, 4))),
    lambda: frechet_distance(np.zeros(5), np.zeros(5)),
    lambda: frechet_distance(np.zeros((1, 3)), np.zeros((5, 3))),
    lambda: frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3))),
    lambda: frechet_distance(np.zeros((5, 3)), np.zeros((5, 3)), covariance="oas"),
    lambda: kid(np.zeros((5, 3)), np.zeros((5, 3)), subsets=0),
    lambda: kid(np.zeros((5, 3)), np.zeros((5, 3)), subset_size=1),
    lambda: precision_recall(np.zeros((5, 3)), np.zeros((5, 3)), k=0),
    lambda: ms_ssim_diversity(np.zeros((1, 16, 16))),
    lambda: ms_ssim_diversity(np.zeros((4, 16))),
    lambda: ms_ssim_diversity(np.zeros((4, 16, 16)), pairs=0),
    lambda: ssim_settings((2, 16)),
])
def test_invalid_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


# ---- diversity --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, method, scales, kernel", [
    ((16, 16), "ssim", 1, 11),
    ((32, 32), "ms_ssim", 3, 7),
    ((64, 64), "ms_ssim", 4, 7),
    ((256, 256), "ms_ssim", 5, 11),
    ((16, 16, 16), "ssim", 1, 11),
    ((8, 8, 8), "ssim", 1, 7),
])
def test_ssim_settings_table(shape, method, scales, kernel):
    s = ssim_settings(shape)
    assert (s["method"], s["scales"], s["kernel_size"]) == (method, scales, kernel)
    assert sum(s["weights"]) == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(16, 16), (32, 32), (8, 8, 8)])
def test_diversity_copies_score_one_and_distinct_images_lower(shape):
    distinct = _smooth_images(6, shape[0], 15, dims=len(shape))
    copies = np.repeat(distinct[:1], 6, axis=0)
    d_copies = ms_ssim_diversity(copies, pairs=10, seed=0)
    d_distinct = ms_ssim_diversity(distinct, pairs=10, seed=0)
    assert d_copies["mean"] == pytest.approx(1.0, abs=1e-4)
    assert d_distinct["mean"] < 0.5
    assert d_distinct["pairs"] == 10 and d_distinct["method"] == ssim_settings(shape)["method"]


def test_diversity_samples_requested_pairs_when_many_images():
    d = ms_ssim_diversity(_smooth_images(30, 16, 16), pairs=25, seed=1)
    assert d["pairs"] == 25
    assert d == ms_ssim_diversity(_smooth_images(30, 16, 16), pairs=25, seed=1)


# ---- encoders ---------------------------------------------------------------------------------

def _two_classes(n: int, size: int = 16, dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Smooth fields; class 1 has a bright centre disc."""
    x = 0.5 * _smooth_images(2 * n, size, 17, dims)
    grid = np.indices((size,) * dims) - size / 2 + 0.5
    x[n:] = np.where((grid**2).sum(0) < (size / 4) ** 2, 0.95, x[n:])
    return x, np.repeat([0, 1], n)


def test_trained_encoder_learns_the_classes_and_is_seeded():
    x, y = _two_classes(12)
    enc = train_encoder(x, y, dims=2, feature_dim=8, epochs=8, seed=0)
    d = enc.description
    assert d["kind"] == "trained" and d["objective"] == "cross_entropy" and d["train_accuracy"] >= 0.9
    f = enc.features(x, batch_size=5)
    assert f.shape == (24, 8) and f.dtype == np.float64
    np.testing.assert_array_equal(f, train_encoder(x, y, 2, 8, 8, seed=0).features(x))
    # Its features separate the classes far more than they separate two halves of one class.
    between = frechet_distance(f[:12], f[12:])
    within = frechet_distance(f[:6], f[6:12])
    assert between > 3 * within


def test_single_class_trains_a_denoising_autoencoder_and_tiny_sets_fall_back():
    x, _ = _two_classes(6)
    enc = train_encoder(x, np.zeros(12, np.int64), dims=2, feature_dim=4, epochs=1, seed=0)
    assert enc.description["objective"] == "denoising_autoencoder" and enc.accuracy(x, np.zeros(12)) is None
    assert enc.features(x).shape == (12, 4)
    tiny = train_encoder(x[:1], np.zeros(1, np.int64), dims=2, feature_dim=4, epochs=1, seed=0)
    assert tiny.kind == "random" and "1 training image" in tiny.description["reason"]


@pytest.mark.parametrize("dims, size", [(2, 16), (3, 8)])
def test_random_encoder_is_fixed_by_its_seed(dims, size):
    x = _smooth_images(5, size, 18, dims)
    a, b, c = (random_encoder(dims, 6, seed=s).features(x) for s in (1, 1, 2))
    assert a.shape == (5, 6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert random_encoder(dims, 6, seed=1).description["kind"] == "random"


@pytest.mark.parametrize("call", [
    lambda: train_encoder(np.zeros((4, 8, 8)), np.zeros(4), dims=3, feature_dim=4, epochs=1, seed=0),
    lambda: train_encoder(np.zeros((4, 8, 8)), np.zeros(3), dims=2, feature_dim=4, epochs=1, seed=0),
    lambda: train_encoder(np.zeros((4, 8, 8)), np.zeros(4), dims=2, feature_dim=4, epochs=0, seed=0),
    lambda: random_encoder(4, 8, 0),
    lambda: random_encoder(2, 0, 0),
    lambda: random_encoder(2, 8, 0).features(np.zeros((2, 8, 8, 8))),
])
def test_invalid_encoder_arguments_raise(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("dims, size", [(2, 16), (3, 8)])
def test_encoders_and_diversity_take_three_channels(dims, size):
    x1 = _smooth_images(6, size, 21, dims)
    x = np.concatenate([x1, -x1, 0.5 * x1], axis=1)  # three sequences
    enc = random_encoder(dims, 6, seed=1, in_channels=3)
    assert enc.features(x).shape == (6, 6) and enc.description["in_channels"] == 3
    with pytest.raises(ValueError, match="expected"):
        enc.features(x1)  # one channel into a three-channel encoder
    trained = train_encoder(x, np.repeat([0, 1], 3), dims=dims, feature_dim=4, epochs=1, seed=0)
    assert trained.net.in_channels == 3 and trained.features(x).shape == (6, 4)
    auto = train_encoder(x, np.zeros(6, np.int64), dims=dims, feature_dim=4, epochs=1, seed=0)  # denoiser decodes C
    assert auto.features(x).shape == (6, 4)
    d = ms_ssim_diversity(x, pairs=5, seed=0)
    assert 0 < d["mean"] < 1 and d["pairs"] == 5
    assert ms_ssim_diversity(np.repeat(x[:1], 3, axis=0), pairs=3)["mean"] == pytest.approx(1.0, abs=1e-4)
