"""Paired comparison of two arms (augmented vs baseline) over the same folds and seeds.

Each arm gives one score per (fold, seed) cell; the two arms of a cell share the test fold and
differ only in training data, so the analysis works on the paired differences d = b - a.

Cross-validation folds share most of their training data, so the plain paired t-test is
over-confident; the Nadeau–Bengio corrected resampled t-test inflates the variance by
``(1/n + n_test/n_train)`` to account for it (Nadeau & Bengio 2003; Bouckaert & Frank 2004 for
repeated CV, where n = folds x repeats). All tests are two-sided. Degenerate inputs (n < 2,
all-zero or zero-variance differences) give ``nan`` with a note, never an exception.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
from scipy import stats


def _nan() -> float:
    return float("nan")


def corrected_se(sd: float, n: int, test_train_ratio: float) -> float:
    """Nadeau–Bengio corrected standard error of a mean over ``n`` resampled splits:
    ``sd * sqrt(1/n + n_test/n_train)`` instead of ``sd / sqrt(n)``, since the splits' training
    sets overlap (Nadeau & Bengio 2003)."""
    return sd * math.sqrt(1.0 / n + test_train_ratio)


def paired_comparison(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> dict:
    """Compare paired scores ``b`` (augmented) against ``a`` (baseline).

    Args:
        a, b: ``(n,)`` scores of the same cells in the same order; a pair with a nan is dropped.
        n_train, n_test: training and test set sizes of one fold, for the Nadeau–Bengio correction
            (both or neither).
        confidence: level of every interval. n_boot: bootstrap resamples. seed: bootstrap seed.

    Returns keys: ``n``, ``n_dropped``, ``mean_a``, ``mean_b``, ``mean_diff`` (b - a),
    ``sd_diff``, ``confidence``, ``ci_low``/``ci_high`` (t interval of the mean difference),
    ``t``/``t_p`` (paired t-test), ``wilcoxon_statistic``/``wilcoxon_p``, ``nb_t``/``nb_p``/
    ``nb_ci_low``/``nb_ci_high`` (Nadeau–Bengio; nan without n_train/n_test),
    ``boot_ci_low``/``boot_ci_high`` (BCa bootstrap of the mean difference), ``cohen_dz``,
    ``hedges_gz``, ``notes``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a, b: expected two 1-D arrays of equal length, got shapes {a.shape} and {b.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: {confidence} must lie in (0, 1)")
    if n_boot < 100:
        raise ValueError(f"n_boot: {n_boot} must be >= 100")
    if (n_train is None) != (n_test is None):
        raise ValueError(f"n_train, n_test: give both or neither, got {n_train} and {n_test}")
    if n_train is not None and (n_train < 1 or n_test < 1):
        raise ValueError(f"n_train, n_test: must be >= 1, got {n_train} and {n_test}")

    notes: list[str] = []
    keep = ~(np.isnan(a) | np.isnan(b))
    if not keep.all():
        notes.append(f"{int((~keep).sum())} pairs with a nan score dropped")
    a, b = a[keep], b[keep]
    d = b - a
    n = int(d.size)
    out = {
        "n": n, "n_dropped": int((~keep).sum()), "confidence": confidence,
        "mean_a": float(a.mean()) if n else _nan(), "mean_b": float(b.mean()) if n else _nan(),
        "mean_diff": float(d.mean()) if n else _nan(), "sd_diff": _nan(),
        "ci_low": _nan(), "ci_high": _nan(), "t": _nan(), "t_p": _nan(),
        "wilcoxon_statistic": _nan(), "wilcoxon_p": _nan(),
        "nb_t": _nan(), "nb_p": _nan(), "nb_ci_low": _nan(), "nb_ci_high": _nan(),
        "boot_ci_low": _nan(), "boot_ci_high": _nan(), "cohen_dz": _nan(), "hedges_gz": _nan(),
        "notes": notes,
    }
    if n < 2:
        notes.append(f"n = {n} pairs: no test is defined below 2")
        return out

    mean, sd = float(d.mean()), float(d.std(ddof=1))
    out["sd_diff"] = sd
    q = float(stats.t.ppf(0.5 + confidence / 2.0, df=n - 1))
    zero_variance = sd <= 1e-12 * max(1.0, abs(mean))

    if zero_variance:
        notes.append("differences have zero variance: t-tests, intervals and effect sizes undefined")
    else:
        # 1. Paired t-test and its interval: mean(d) ± t_{n-1} * sd / sqrt(n).
        res = stats.ttest_rel(b, a)
        out["t"], out["t_p"] = float(res.statistic), float(res.pvalue)
        half = q * sd / math.sqrt(n)
        out["ci_low"], out["ci_high"] = mean - half, mean + half
        # 2. Effect size d_z = mean(d) / sd(d); Hedges' small-sample factor J = 1 - 3 / (4 (n - 1) - 1).
        out["cohen_dz"] = mean / sd
        # J is 0 at n = 2 (one degree of freedom), which would read as "no effect": no g_z there.
        out["hedges_gz"] = (1.0 - 3.0 / (4.0 * (n - 1) - 1.0)) * mean / sd if n > 2 else _nan()
        # 3. Nadeau–Bengio: Var(mean d) ≈ (1/n + n_test/n_train) sd^2 instead of sd^2 / n.
        if n_train is not None:
            se_nb = corrected_se(sd, n, n_test / n_train)
            t_nb = mean / se_nb
            out["nb_t"] = t_nb
            out["nb_p"] = float(2.0 * stats.t.sf(abs(t_nb), df=n - 1))
            out["nb_ci_low"], out["nb_ci_high"] = mean - q * se_nb, mean + q * se_nb

    # 4. Wilcoxon signed-rank; zero differences are dropped (zero_method="wilcox").
    if np.all(d == 0):
        notes.append("all differences are zero: Wilcoxon test undefined")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-n exact/normal-approximation warnings
            res = stats.wilcoxon(d)
        out["wilcoxon_statistic"], out["wilcoxon_p"] = float(res.statistic), float(res.pvalue)

    # 5. Bootstrap interval of the mean difference (BCa; percentile when BCa degenerates).
    if zero_variance:
        out["boot_ci_low"] = out["boot_ci_high"] = mean
    else:
        rng = np.random.default_rng(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            boot = stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                                   method="BCa", rng=rng)
            low, high = boot.confidence_interval
            if not (np.isfinite(low) and np.isfinite(high)):
                notes.append("bootstrap: BCa degenerate, percentile interval used")
                boot = stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                                       method="percentile", rng=np.random.default_rng(seed))
                low, high = boot.confidence_interval
        out["boot_ci_low"], out["boot_ci_high"] = float(low), float(high)
    return out


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm–Bonferroni step-down adjusted p-values (Holm 1979).

    With the m non-nan p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value is
    ``min(1, max_{j <= i} (m - j + 1) p_(j))``. A nan p-value stays nan and does not count in m.
    """
    for name, p in pvalues.items():
        if not (isinstance(p, (int, float, np.floating)) and (np.isnan(p) or 0.0 <= p <= 1.0)):
            raise ValueError(f"pvalues[{name!r}]: {p!r} is not a probability in [0, 1] or nan")
    valid = sorted(((float(p), name) for name, p in pvalues.items() if not np.isnan(p)), key=lambda x: x[0])
    m = len(valid)
    adjusted: dict[str, float] = {name: _nan() for name, p in pvalues.items() if np.isnan(p)}
    running = 0.0
    for i, (p, name) in enumerate(valid):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[name] = running
    return {name: adjusted[name] for name in pvalues}
