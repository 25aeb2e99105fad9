"""From trial rows and test predictions to the report's numbers: summaries, paired tests, ROC, confusion.

The unit of analysis is the split (one fold of one CV repeat): the seeds of a split share its
training and test data, so they are averaged first and are not counted as replicates. Every
condition is compared with ``baseline`` at the same real-data size, paired by split.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Optional

import numpy as np
from scipy import stats

from raysynth.analysis.stats import corrected_se, holm, paired_comparison
from raysynth.artifacts import fraction_key
from raysynth.design import BASELINE

PRIMARY_TEST = {
    "name": "nb",
    "label": "Nadeau-Bengio corrected resampled t-test",
    "why": "the training sets of cross-validation splits overlap, so the per-split differences are positively "
           "correlated and the plain paired t-test (the paper's choice, reported beside it for comparability) "
           "underestimates their variance and rejects too often; the corrected test inflates the variance by "
           "(1/n + n_test/n_train) (Nadeau & Bengio 2003; Bouckaert & Frank 2004 for repeated CV). Holm's "
           "step-down adjustment across the conditions compared with baseline at one real-data size controls "
           "the family-wise error of those comparisons",
}


BOUNDED = {"accuracy": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0), "sensitivity": (0.0, 1.0),
           "specificity": (0.0, 1.0), "auc": (0.0, 1.0), "ece": (0.0, 1.0), "mean_dice": (0.0, 1.0)}
"""Metrics with a bounded range. Their t intervals are clipped to it (a mean's interval cannot leave
the range its values live in); differences of two of them, to the range's width either side of 0.
Each clipped cell says so (``clipped``)."""

INTERVAL_KEYS = (("ci_low", "ci_high"), ("nb_ci_low", "nb_ci_high"), ("boot_ci_low", "boot_ci_high"))


def clip_intervals(cell: dict, metric: str, difference: bool = False) -> dict:
    """``cell`` with its intervals clipped to ``metric``'s bounds (see :data:`BOUNDED`)."""
    if metric not in BOUNDED:
        return cell
    lo, hi = BOUNDED[metric]
    if difference:
        lo, hi = -(hi - lo), hi - lo
    clipped = False
    for keys in INTERVAL_KEYS:
        for key in keys:
            v = cell.get(key)
            if isinstance(v, float) and math.isfinite(v) and not lo <= v <= hi:
                cell[key], clipped = min(max(v, lo), hi), True
    if clipped:
        cell["clipped"] = [lo, hi]
    return cell


def _finite(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def fold_means(rows: list[dict], metric: str) -> dict[str, dict[str, dict[int, float]]]:
    """``{fraction key: {condition: {split: metric averaged over seeds}}}``."""
    acc: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if _finite(r.get(metric)):
            acc[fraction_key(r["real_fraction"])][r["condition"]][int(r["fold"])].append(float(r[metric]))
    return {p: {c: {f: float(np.mean(v)) for f, v in sorted(by_fold.items())} for c, by_fold in by_c.items()}
            for p, by_c in acc.items()}


def sizes(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean real training and test sizes per fraction (from the arms that train on real data)."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: {"n_real": [], "n_test": []})
    for r in rows:
        if r["n_real"] > 0:
            out[fraction_key(r["real_fraction"])]["n_real"].append(r["n_real"])
        out[fraction_key(r["real_fraction"])]["n_test"].append(r["n_test"])
    return {p: {k: float(np.mean(v)) if v else float("nan") for k, v in d.items()} for p, d in out.items()}


def summarise(rows: list[dict], metrics: list[str], confidence: float = 0.95) -> dict:
    """Per fraction, condition and metric: mean and sd over splits, with a t interval and the
    Nadeau-Bengio corrected interval (the honest one when splits share training data)."""
    n_sizes = sizes(rows)
    out: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    trials: dict[tuple, int] = defaultdict(int)
    for r in rows:
        trials[(fraction_key(r["real_fraction"]), r["condition"])] += 1
    for m in metrics:
        for p, by_c in fold_means(rows, m).items():
            for c, by_fold in by_c.items():
                v = np.array(list(by_fold.values()))
                n, mean = len(v), float(v.mean())
                cell = {"mean": mean, "sd": float(v.std(ddof=1)) if n > 1 else 0.0, "n_splits": n,
                        "n_trials": trials[(p, c)], "ci_low": float("nan"), "ci_high": float("nan"),
                        "nb_ci_low": float("nan"), "nb_ci_high": float("nan")}
                if n > 1:
                    q = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1))
                    half = q * cell["sd"] / math.sqrt(n)
                    ratio = n_sizes[p]["n_test"] / n_sizes[p]["n_real"] if n_sizes[p]["n_real"] > 0 else 0.0
                    nb_half = q * corrected_se(cell["sd"], n, ratio)
                    cell.update(ci_low=mean - half, ci_high=mean + half, nb_ci_low=mean - nb_half, nb_ci_high=mean + nb_half)
                out[p][c][m] = clip_intervals(cell, m)
    return {p: dict(by_c) for p, by_c in out.items()}


def compare(rows: list[dict], metrics: list[str]) -> dict:
    """``{fraction: {condition: {metric: paired_comparison + Holm}}}`` against baseline, by split."""
    n_sizes = sizes(rows)
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for m in metrics:
        for p, by_c in fold_means(rows, m).items():
            base = by_c.get(BASELINE)
            if base is None:
                continue
            block = out.setdefault(p, {})
            for c in sorted(set(by_c) - {BASELINE}):
                folds = sorted(set(base) & set(by_c[c]))
                if len(folds) < 2:
                    block.setdefault(c, {})[m] = {"n": len(folds), "note": "fewer than 2 paired splits"}
                    continue
                a = np.array([base[f] for f in folds])
                b = np.array([by_c[c][f] for f in folds])
                res = paired_comparison(a, b, n_train=n_sizes[p]["n_real"], n_test=n_sizes[p]["n_test"])
                block.setdefault(c, {})[m] = clip_intervals({**res, "folds": folds, "differences": (b - a).tolist()},
                                                            m, difference=True)
            # Holm across the conditions compared with baseline at this size, per metric and test.
            for test in ("t_p", "nb_p", "wilcoxon_p"):
                pvals = {c: block[c][m][test] for c in block if test in block[c].get(m, {})}
                for c, p_adj in holm(pvals).items():
                    block[c][m][f"{test}_holm"] = p_adj
    return out


def roc_curves(predictions: Optional[list[dict]], num_classes: int, points: int = 101) -> dict:
    """Per fraction and condition, the ROC curve of all test predictions pooled over splits and
    seeds: the positive class for two classes, else the macro average of one-vs-rest curves on a
    common false-positive grid. Stored rounded, so it travels in report.json."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if not predictions:
        return {}
    grid = np.linspace(0.0, 1.0, points)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in predictions:
        groups[(fraction_key(r["real_fraction"]), r["condition"])].append(r)
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (p, c), rs in sorted(groups.items()):
        y = np.array([r["y_true"] for r in rs])
        prob = np.array([r["y_prob"] for r in rs], dtype=float)
        if len(set(y.tolist())) < 2:
            continue
        classes = [1] if num_classes == 2 else list(range(num_classes))
        tprs = []
        for k in classes:
            if not (y == k).any() or (y == k).all():
                continue
            fpr, tpr, _ = roc_curve(y == k, prob[:, k])
            tprs.append(np.interp(grid, fpr, tpr))
            tprs[-1][0] = 0.0
        if num_classes == 2:
            auc = float(roc_auc_score(y == 1, prob[:, 1]))
        else:
            auc = float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(num_classes))))
        out[p][c] = {"tpr": np.round(np.mean(tprs, axis=0), 4).tolist(), "auc_pooled": auc, "n": len(rs),
                     "kind": "positive class" if num_classes == 2 else "macro one-vs-rest"}
    return {"fpr": np.round(grid, 4).tolist(), "curves": {p: dict(v) for p, v in out.items()}} if out else {}


def confusion_matrices(predictions: Optional[list[dict]], num_classes: int) -> dict:
    """Per fraction and condition, the confusion matrix (rows: true, columns: predicted) summed
    over splits and seeds, so each test record counts once per seed."""
    if not predictions:
        return {}
    out: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    for r in predictions:
        p, c = fraction_key(r["real_fraction"]), r["condition"]
        mat = out[p].setdefault(c, np.zeros((num_classes, num_classes), dtype=np.int64))
        mat[int(r["y_true"]), int(np.argmax(r["y_prob"]))] += 1
    return {p: {c: m.tolist() for c, m in sorted(by_c.items())} for p, by_c in out.items()}
