"""Memorisation: the nearest real training image of every synthetic sample, and the privacy gate.

Diffusion models reproduce training images more often when trained on little data and on 2D
slices of 3D volumes (Akbar et al. 2023; Dar et al. 2024), so every synthetic sample is compared
with every real training image. Two views are offered:

* pixel space: normalised cross-correlation (Pearson correlation of the flattened images), which
  is invariant to an affine change of intensity, so a rescaled copy still scores 1;
* feature space: cosine similarity (or L2 distance) of encoder features, which also catches
  copies that are slightly shifted or deformed.

The gate counts samples whose nearest NCC exceeds a threshold and fails the run when their
fraction exceeds a limit.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.metrics import pairwise_distances_argmin_min

FeatureMetric = Literal["cosine", "l2"]
FEATURE_METRICS = ("cosine", "l2")


def _normalise_rows(images: np.ndarray) -> np.ndarray:
    """Flatten every non-batch axis (channels too) to ``(N, P)`` float32, zero mean and unit L2 norm per row.

    A constant image has no defined correlation; its row stays all zero so that its NCC with
    anything is 0 (it cannot be flagged as a copy of a textured image, nor vice versa).
    """
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-12)


def nearest_ncc(synthetic: np.ndarray, real: np.ndarray, chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """For each synthetic image, the highest NCC with any real image, and that image's index.

    NCC(a, b) = <a - mean(a), b - mean(b)> / (||a - mean(a)|| ||b - mean(b)||), in [-1, 1].
    A normalised-correlation search is one matrix product of unit rows, so it stays in numpy.

    Args:
        synthetic: ``(M, *spatial)`` images, or ``(M, C, *spatial)`` with C channels: every
            non-batch axis is flattened, so a multi-channel image is one vector (one mean, one norm
            over all its channels) and NCC stays invariant to one affine intensity change of it.
        real: ``(N, ...)`` images with the same non-batch shape, N >= 1.
        chunk_size: synthetic rows per matrix product; bounds memory at ``chunk_size * N`` floats
            besides the normalised real matrix ``(N, P)`` float32.

    Returns:
        ``best_ncc`` ``(M,)`` float64 and ``best_index`` ``(M,)`` int64 into ``real``.
    """
    synthetic, real = np.asarray(synthetic), np.asarray(real)
    if synthetic.ndim < 2 or real.ndim < 2:
        raise ValueError(f"expected (N, *spatial) or (N, C, *spatial) arrays, got synthetic {synthetic.shape} "
                         f"and real {real.shape}")
    if synthetic.shape[1:] != real.shape[1:]:
        raise ValueError(f"image shapes differ: synthetic {synthetic.shape[1:]} vs real {real.shape[1:]}")
    if len(real) == 0:
        raise ValueError("real: at least one real image is needed")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size} must be >= 1")
    r = _normalise_rows(real)
    best = np.empty(len(synthetic), dtype=np.float64)
    index = np.empty(len(synthetic), dtype=np.int64)
    for start in range(0, len(synthetic), chunk_size):
        s = _normalise_rows(synthetic[start : start + chunk_size])
        ncc = s @ r.T  # (chunk, N): unit-norm rows, so the dot product is the correlation
        j = np.argmax(ncc, axis=1)
        index[start : start + len(s)] = j
        best[start : start + len(s)] = ncc[np.arange(len(s)), j]
    # float32 round-off can push an exact copy a hair above 1.
    return np.clip(best, -1.0, 1.0), index


def nearest_feature(
    synth_f: np.ndarray, real_f: np.ndarray, metric: FeatureMetric = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """For each synthetic feature vector, its nearest real one.

    Args:
        synth_f: ``(M, F)``; real_f: ``(N, F)``, N >= 1.
        metric: ``cosine`` (returns the highest cosine similarity: higher = closer) or ``l2``
            (returns the smallest Euclidean distance: lower = closer).

    Returns:
        ``(value (M,) float64, index (M,) int64)``.
    """
    if metric not in FEATURE_METRICS:
        raise ValueError(f"metric: {metric!r} is not valid; choose one of {list(FEATURE_METRICS)}")
    s, r = np.asarray(synth_f, dtype=np.float64), np.asarray(real_f, dtype=np.float64)
    if s.ndim != 2 or r.ndim != 2 or s.shape[1] != r.shape[1]:
        raise ValueError(f"expected (M, F) and (N, F) features, got {s.shape} and {r.shape}")
    if len(r) == 0:
        raise ValueError("real_f: at least one real feature vector is needed")
    if len(s) == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    # sklearn chunks the (M, N) distance matrix by its working memory; argmin takes the first of ties.
    j, d = pairwise_distances_argmin_min(s, r, metric="cosine" if metric == "cosine" else "euclidean")
    # Cosine distance is 1 - similarity (a zero vector has similarity 0 with anything, as before).
    return (1.0 - d if metric == "cosine" else d).astype(np.float64), j.astype(np.int64)


def privacy_gate(best_ncc: np.ndarray, threshold: float = 0.95, max_fraction: float = 0.01,
                 reference_fraction: float = 0.0) -> dict:
    """Fail when the fraction of samples with a nearest-real NCC above ``threshold`` exceeds
    ``reference_fraction + max_fraction``.

    ``reference_fraction`` is the fraction of genuinely new real scans (held out from the
    generator) above the same threshold: a faithful generator's samples cross it about as often,
    so only the excess over it counts as memorisation. Without it, a threshold set at the real
    scans' 99th percentile flags about 1% of a faithful generator's samples, and a 1% allowance
    fails such a generator about half the time.

    Args:
        best_ncc: ``(M,)`` nearest-real NCC of each synthetic sample (from :func:`nearest_ncc`).
        threshold: NCC strictly above it marks a sample as a near-copy; in (0, 1].
        max_fraction: the largest allowed excess fraction of near-copies; in [0, 1].
        reference_fraction: held-out real scans' fraction above ``threshold``; in [0, 1].

    Returns:
        ``{"passed", "fraction", "count", "total", "threshold", "max_fraction", "reference_fraction",
        "excess", "offending_indices"}``;
        ``offending_indices`` index ``best_ncc``, closest first. No samples pass vacuously.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold: {threshold} must lie in (0, 1]")
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction: {max_fraction} must lie in [0, 1]")
    if not 0.0 <= reference_fraction <= 1.0:
        raise ValueError(f"reference_fraction: {reference_fraction} must lie in [0, 1]")
    best_ncc = np.asarray(best_ncc, dtype=np.float64)
    if best_ncc.ndim != 1:
        raise ValueError(f"best_ncc: expected a 1D array, got shape {best_ncc.shape}")
    if np.any(np.isnan(best_ncc)):
        raise ValueError("best_ncc: contains NaN")
    offending = np.flatnonzero(best_ncc > threshold)
    offending = offending[np.argsort(-best_ncc[offending], kind="stable")]
    fraction = len(offending) / len(best_ncc) if len(best_ncc) else 0.0
    return {
        "passed": bool(fraction - reference_fraction <= max_fraction + 1e-12),
        "fraction": float(fraction),
        "reference_fraction": float(reference_fraction),
        "excess": float(fraction - reference_fraction),
        "count": int(len(offending)),
        "total": int(len(best_ncc)),
        "threshold": float(threshold),
        "max_fraction": float(max_fraction),
        "offending_indices": [int(i) for i in offending],
    }


__all__ = ["nearest_ncc", "nearest_feature", "privacy_gate", "FEATURE_METRICS"]
