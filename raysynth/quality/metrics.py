"""Fidelity, coverage and diversity metrics on encoder features or on images.

All feature arguments are 2D arrays ``(n, F)``; image arguments are ``(N, *spatial)`` in [-1, 1].
Every function validates its inputs and raises ``ValueError`` naming the bad value.

Small samples are the normal case here (tens of images per class against ``F`` = 64 features),
so the sample covariance is singular. ``frechet_distance`` therefore offers a Ledoit-Wolf
shrinkage covariance (``covariance="ledoit_wolf"``), which tends to the sample covariance as n
grows; the quality stage uses it for every comparison so that all its numbers share one estimator.
FD and precision/recall are biased in n (Chong & Forsyth 2020); KID is unbiased.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.metrics import pairwise_distances_chunked
from sklearn.neighbors import NearestNeighbors

logger = logging.getLogger(__name__)

Covariance = Literal["auto", "sample", "ledoit_wolf"]
COVARIANCES = ("auto", "sample", "ledoit_wolf")

# Wang et al. (2003) scale weights; MS-SSIM with fewer scales uses the first n, renormalised.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_features(name: str, f: np.ndarray, min_n: int = 2) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name}: expected a 2D array (n, F), got shape {f.shape}")
    if f.shape[0] < min_n:
        raise ValueError(f"{name}: need at least {min_n} samples, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return f


def _check_pair(f1: np.ndarray, f2: np.ndarray, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    f1, f2 = _check_features("f1", f1, min_n), _check_features("f2", f2, min_n)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: f1 has {f1.shape[1]}, f2 has {f2.shape[1]}")
    return f1, f2


def _covariance(f: np.ndarray, method: str) -> np.ndarray:
    if method == "ledoit_wolf":
        return LedoitWolf(assume_centered=False).fit(f).covariance_
    return np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(f1: np.ndarray, f2: np.ndarray, covariance: Covariance = "auto", eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017).

    Args:
        f1, f2: features ``(n1, F)`` and ``(n2, F)``, n >= 2 each.
        covariance: ``sample`` (np.cov, as in FID), ``ledoit_wolf`` (shrinkage, well-conditioned
            when n <= F), or ``auto``: ``ledoit_wolf`` when either n <= F, else ``sample``.
        eps: diagonal offset added when the product of covariances has no finite square root.

    Returns:
        ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))``, clipped at 0 (MONAI's
        ``compute_frechet_distance`` on these moments, see :func:`_monai_frechet`).
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance: {covariance!r} is not valid; choose one of {list(COVARIANCES)}")
    f1, f2 = _check_pair(f1, f2)
    if covariance == "auto":
        covariance = "ledoit_wolf" if min(len(f1), len(f2)) <= f1.shape[1] else "sample"
    s1, s2 = _covariance(f1, covariance), _covariance(f2, covariance)
    return max(_monai_frechet(f1.mean(axis=0), s1, f2.mean(axis=0), s2, eps), 0.0)


def _monai_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """MONAI's Fréchet distance between N(mu1, s1) and N(mu2, s2), on our own moment estimates.

    ``monai.metrics.fid.compute_frechet_distance`` (public in MONAI 1.6.1, pinned) takes means and
    covariances; ``get_fid_score`` would impose ``np.cov``. It retries with ``eps`` on the diagonals
    when scipy's sqrtm is not finite, and raises ``ValueError`` when sqrt(S1 S2) keeps an imaginary
    diagonal above 1e-3 (never seen with Ledoit-Wolf, whose covariances are positive definite).
    Its sqrtm call passes ``disp=False``, deprecated in SciPy 1.17 and removed in 1.18: check this
    call when bumping scipy. Agrees with the former hand-written version to <= 3e-8 relative on
    random features (2e-13 with Ledoit-Wolf); at n = 2 it is more accurate (5e-9 against an
    eigendecomposition, where the former eps retry was off by up to 1e-3). It can return
    ``-1e-14`` for identical sets, hence the caller's clamp at 0. The retry announces itself with a
    ``print`` (MONAI's, left alone: redirecting stdout is process-wide).
    """
    from monai.metrics.fid import compute_frechet_distance

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fd = float(compute_frechet_distance(t(mu1), t(s1), t(mu2), t(s2), epsilon=eps))
        except ValueError as exc:  # a large imaginary part: the covariance estimate is degenerate
            raise ValueError(f"frechet_distance: sqrt(S1 S2) is not real ({exc}); "
                             f"covariance='ledoit_wolf' is well conditioned") from None
    # scipy warns about a singular product (n <= F with the sample covariance), as the former code
    # silently tolerated; the disp DeprecationWarning is MONAI's business.
    for w in caught:
        if not issubclass(w.category, DeprecationWarning):
            logger.debug("frechet_distance: %s", w.message)
    return fd


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / F + 1)^3.

    Args:
        f1, f2: features ``(n1, F)`` and ``(n2, F)``, n >= 2 each.
        subsets: number of random subsets the estimate is averaged over.
        subset_size: samples per subset, capped at ``min(n1, n2)``.
        seed: seeds the subset draws.

    Returns:
        ``(mean, std)`` of MMD^2 over the subsets. The estimator (as in torch-fidelity and
        clean-fid) is unbiased for independent samples, so it scatters around 0 for one distribution
        and can be slightly negative; passing the *same* array twice gives a small negative value of
        order ``-E[k(x, x)] / m``, not exactly 0. When ``subset_size >= min(n1, n2)`` every subset
        is the whole smaller set and ``std`` says nothing about sampling error.
    """
    if subsets < 1:
        raise ValueError(f"subsets: {subsets} must be >= 1")
    if subset_size < 2:
        raise ValueError(f"subset_size: {subset_size} must be >= 2")
    f1, f2 = _check_pair(f1, f2)
    m = min(subset_size, len(f1), len(f2))
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        # Unbiased MMD^2: drop the diagonal of the within-set kernels (Gretton et al. 2012, eq. 3).
        values[s] = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2.0 * kxy.mean()
    return float(values.mean()), float(values.std())


def effective_k(k: int, n_real: int, n_fake: int) -> int:
    """The k actually used by :func:`precision_recall`: at most n - 1 of the smaller set."""
    if k < 1:
        raise ValueError(f"k: {k} must be >= 1")
    return max(1, min(k, n_real - 1, n_fake - 1))


def _knn_radii(f: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour in ``f``, the point itself not counted."""
    # Queried with f itself, each point is its own nearest (distance 0), so column k is the k-th other one.
    return NearestNeighbors(n_neighbors=k + 1).fit(f).kneighbors(f)[0][:, k]


def _fraction_inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``points`` within ``radii[i]`` of some ``centres[i]`` (chunked by sklearn's working memory)."""
    # Not "euclidean": its |x|^2 + |y|^2 - 2 x.y expansion leaves ~1e-8 where the distance is 0, which
    # puts an exact copy of a duplicated real point (radius 0 at small k) outside its ball.
    # "minkowski" (p = 2) differences the coordinates (scipy's cdist, under sklearn's chunking).
    chunks = pairwise_distances_chunked(points, centres, metric="minkowski")
    inside = sum(int(np.any(d <= radii[None, :], axis=1).sum()) for d in chunks)
    return inside / len(points)


def precision_recall(real_f: np.ndarray, fake_f: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. Precision is the fraction of fake samples inside
    the real manifold (fidelity); recall the fraction of real samples inside the fake one (coverage).

    Args:
        real_f, fake_f: features ``(n_real, F)`` and ``(n_fake, F)``, n >= 2 each.
        k: neighbour rank; reduced to ``n - 1`` of the smaller set (see :func:`effective_k`).

    Returns:
        ``(precision, recall)``, each in [0, 1].
    """
    real_f, fake_f = _check_pair(real_f, fake_f)
    k_eff = effective_k(k, len(real_f), len(fake_f))
    if k_eff != k:
        logger.debug("precision_recall: k reduced from %d to %d for %d real / %d fake samples",
                     k, k_eff, len(real_f), len(fake_f))
    precision = _fraction_inside(fake_f, real_f, _knn_radii(real_f, k_eff))
    recall = _fraction_inside(real_f, fake_f, _knn_radii(fake_f, k_eff))
    return precision, recall


def ssim_settings(spatial_shape: tuple[int, ...]) -> dict:
    """Choose MS-SSIM scales and window for an image size, or fall back to single-scale SSIM.

    MONAI's ``compute_ms_ssim`` needs ``side // (scales - 1)^2 > kernel - 1`` and every pyramid level
    must hold one window. The standard setting (5 scales, 11-voxel window, Wang et al. 2003) needs
    sides of 176+; smaller images get the most scales (5, 4, then 3) whose largest odd window of
    5..11 fits. Images too small for 3 scales with a 5-voxel window (e.g. 16 px) use single-scale
    SSIM with the largest odd window up to 11 that fits.
    """
    side = min(spatial_shape)
    if side < 3:
        raise ValueError(f"spatial_shape: {spatial_shape} is too small for SSIM (need every side >= 3)")
    for scales in (5, 4, 3):
        div, smallest = (scales - 1) ** 2, side // 2 ** (scales - 1)
        for kernel in (11, 9, 7, 5):
            # MONAI's own check (strict), and the coarsest pyramid level must hold one window.
            if side // div > kernel - 1 and smallest >= kernel:
                weights = np.asarray(MS_SSIM_WEIGHTS[:scales])
                return {"method": "ms_ssim", "scales": scales, "kernel_size": kernel,
                        "weights": [float(w) for w in weights / weights.sum()]}
    kernel = min(11, side if side % 2 else side - 1)
    return {"method": "ssim", "scales": 1, "kernel_size": kernel, "weights": [1.0]}


def _ssim_fn(spatial_dims: int, settings: dict):
    from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs

    k = (settings["kernel_size"],) * spatial_dims
    if settings["method"] == "ms_ssim":
        return lambda x, y: compute_ms_ssim(x, y, spatial_dims, data_range=1.0, kernel_size=k,
                                            weights=settings["weights"]).reshape(len(x), -1).mean(1)
    return lambda x, y: compute_ssim_and_cs(x, y, spatial_dims, k, (1.5,) * spatial_dims,
                                            data_range=1.0)[0].flatten(1).mean(1)


def ms_ssim_diversity(images: np.ndarray, pairs: int = 200, seed: int = 0, batch_size: int = 64) -> dict:
    """Mean (MS-)SSIM over random distinct pairs within one set: lower means more diverse.

    Args:
        images: ``(N, C, *spatial)`` in [-1, 1], 2D or 3D, N >= 2 (SSIM per channel, averaged over
            channels). Shifted to [0, 1] (data range 1) so that SSIM's luminance term sees
            non-negative intensities, as it assumes.
        pairs: number of random unordered pairs; all pairs are used when there are fewer.
        seed: seeds the pair draw.

    Returns:
        ``{"mean", "std", "pairs", "method", "scales", "kernel_size"}`` (see :func:`ssim_settings`).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim not in (4, 5):
        raise ValueError(f"images: expected (N, C, H, W) or (N, C, D, H, W), got shape {images.shape}")
    if len(images) < 2:
        raise ValueError(f"images: need at least 2 images for pairs, got {len(images)}")
    if pairs < 1:
        raise ValueError(f"pairs: {pairs} must be >= 1")
    n = len(images)
    total = n * (n - 1) // 2
    if total <= pairs:
        idx = np.array(np.triu_indices(n, k=1)).T
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, n, size=pairs)
        j = (i + rng.integers(1, n, size=pairs)) % n  # j != i by construction
        idx = np.stack([i, j], axis=1)
    settings = ssim_settings(images.shape[2:])
    fn = _ssim_fn(images.ndim - 2, settings)
    x = torch.from_numpy((images + 1.0) / 2.0)
    scores = []
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            b = torch.from_numpy(idx[start : start + batch_size])
            scores.append(fn(x[b[:, 0]], x[b[:, 1]]).double().numpy())
    s = np.concatenate(scores)
    return {"mean": float(s.mean()), "std": float(s.std()), "pairs": int(len(s)), **{
        k: settings[k] for k in ("method", "scales", "kernel_size")}}


__all__ = ["frechet_distance", "kid", "precision_recall", "effective_k", "ms_ssim_diversity", "ssim_settings",
           "COVARIANCES"]
