"""Downstream metrics: classification (scikit-learn), segmentation (MONAI) and calibration.

Every function returns plain Python floats, lists and dicts so that a result can go straight
into JSON or a Parquet row. An undefined value (a class absent from the test fold, an empty
mask) is ``nan`` with a line in ``notes`` saying why, never a crash and never a silent 0.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    roc_auc_score,
)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def nanmean(values: Iterable[float]) -> float:
    """The mean of the finite values; NaN when there are none (without numpy's empty-slice warning)."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.nanmean(arr)) if arr.size and not np.all(np.isnan(arr)) else float("nan")


def _check_probabilities(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or y_prob.shape[1] < 2:
        raise ValueError(f"y_prob: expected shape (N, K) with K >= 2, got {y_prob.shape}")
    if y_true.shape != (y_prob.shape[0],):
        raise ValueError(f"y_true: expected shape ({y_prob.shape[0]},) to match y_prob, got {y_true.shape}")
    if y_true.size == 0:
        raise ValueError("y_true: no samples")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true: expected integer class indices, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= y_prob.shape[1]:
        raise ValueError(f"y_true: labels must lie in [0, {y_prob.shape[1] - 1}], got {sorted(set(y_true.tolist()))}")
    return y_true.astype(np.int64), y_prob


def classification_metrics(y_true: np.ndarray, y_prob: np.ndarray, class_names: list[str]) -> dict:
    """Headline and per-class metrics of a K-class classifier.

    Args:
        y_true: ``(N,)`` integer labels in ``[0, K)``.
        y_prob: ``(N, K)`` class probabilities (rows sum to 1); the prediction is the argmax.
        class_names: ``K`` names, used as keys of the per-class dicts.

    Returns keys: ``accuracy``, ``balanced_accuracy``, ``sensitivity``, ``specificity`` (K == 2:
    of the positive class 1; K > 2: macro means over classes present), ``sensitivity_per_class``,
    ``specificity_per_class``, ``auc`` (K == 2: ROC AUC of class 1; K > 2: macro one-vs-rest),
    ``auc_per_class``, ``ece``, ``confusion_matrix`` (rows: true, columns: predicted), ``n``,
    ``notes``.
    """
    y_true, y_prob = _check_probabilities(y_true, y_prob)
    k = y_prob.shape[1]
    if len(class_names) != k:
        raise ValueError(f"class_names: {len(class_names)} names for {k} classes ({class_names})")
    labels = list(range(k))
    y_pred = y_prob.argmax(axis=1)
    present = set(np.unique(y_true).tolist())
    notes = [f"class {class_names[c]!r} absent from y_true" for c in labels if c not in present]

    # Per-class one-vs-rest 2x2 tables [[TN, FP], [FN, TP]]; sensitivity of an absent class is undefined.
    tables = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    sens = {class_names[c]: _ratio(t[1, 1], t[1, 0] + t[1, 1]) for c, t in zip(labels, tables)}
    spec = {class_names[c]: _ratio(t[0, 0], t[0, 0] + t[0, 1]) for c, t in zip(labels, tables)}

    # sklearn warns and averages over the classes present in y_true when one is absent: that is
    # the definition we want (recall is undefined for an absent class), so silence the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y_true, y_pred))

    auc_per_class: dict[str, float] = {}
    if k == 2:
        if len(present) == 2:
            auc = float(roc_auc_score(y_true, y_prob[:, 1]))
        else:
            auc = float("nan")
            notes.append("auc: undefined with a single class in y_true")
        headline_sens, headline_spec = sens[class_names[1]], spec[class_names[1]]
    else:
        # One-vs-rest per class; a class absent from y_true (or the only class) has no ROC curve.
        for c in labels:
            positives = y_true == c
            if positives.all() or not positives.any():
                auc_per_class[class_names[c]] = float("nan")
                continue
            auc_per_class[class_names[c]] = float(roc_auc_score(positives, y_prob[:, c]))
        skipped = [n for n, v in auc_per_class.items() if np.isnan(v)]
        if skipped:
            notes.append(f"auc: classes {skipped} left out of the macro one-vs-rest mean")
        auc = nanmean(list(auc_per_class.values()))
        headline_sens, headline_spec = nanmean(list(sens.values())), nanmean(list(spec.values()))

    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced,
        "sensitivity": headline_sens,
        "specificity": headline_spec,
        "sensitivity_per_class": sens,
        "specificity_per_class": spec,
        "auc": auc,
        "auc_per_class": auc_per_class,
        "ece": expected_calibration_error(y_true, y_prob),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "notes": notes,
    }


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """``(N, *S)`` integer map -> ``(N, C, *S)`` float one-hot, MONAI's metric layout."""
    t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 1).float()


def segmentation_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    class_names: Optional[list[str]] = None,
    spacing: Optional[Sequence[float]] = None,
) -> dict:
    """Dice and 95th-percentile Hausdorff distance per foreground class.

    Args:
        pred: ``(N, *S)`` integer label map (argmax of the network), values in ``[0, C)``.
        target: ``(N, *S)`` integer ground truth, same shape.
        num_classes: ``C``, including background (class 0, left out of every score).
        class_names: ``C`` names (background first); default ``["0", ..., "C-1"]``.
        spacing: voxel size per spatial axis in mm for HD95; default 1.

    Empty masks follow nnU-Net: Dice is ``nan`` when prediction and target are both empty (no
    information), 0 when only one is; HD95 is ``nan`` when either is empty (no surface to measure).
    Means over samples and classes ignore ``nan``.

    Returns keys: ``dice`` and ``hd95`` (per foreground class name: mean over samples),
    ``mean_dice``, ``mean_hd95``, ``per_sample_dice`` (``(N,)`` list: mean over classes),
    ``n``, ``notes``.
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred: shape {pred.shape} differs from target shape {target.shape}")
    if pred.ndim not in (3, 4):
        raise ValueError(f"pred: expected (N, H, W) or (N, D, H, W), got shape {pred.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes: {num_classes} must be >= 2 (background and one structure)")
    for name, arr in (("pred", pred), ("target", target)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name}: labels must lie in [0, {num_classes - 1}], got max {arr.max()}")
    names = class_names if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names: {len(names)} names for {num_classes} classes ({names})")
    if spacing is not None and len(spacing) != pred.ndim - 1:
        raise ValueError(f"spacing: {tuple(spacing)} needs one value per spatial axis ({pred.ndim - 1})")

    y_pred, y = _one_hot(pred, num_classes), _one_hot(target, num_classes)
    spatial = tuple(range(2, y.ndim))
    pred_empty = (y_pred[:, 1:].sum(dim=spatial) == 0).numpy()
    target_empty = (y[:, 1:].sum(dim=spatial) == 0).numpy()

    # (N, C-1). ignore_empty=False scores a false positive on an empty target as 0.
    dice = compute_dice(y_pred, y, include_background=False, ignore_empty=False).numpy().astype(np.float64)
    dice[pred_empty & target_empty] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks; we mark those nan below
        hd = compute_hausdorff_distance(
            y_pred, y, include_background=False, percentile=95,
            spacing=None if spacing is None else [float(s) for s in spacing],
        ).numpy().astype(np.float64)
    hd[pred_empty | target_empty] = np.nan

    notes = []
    if np.isnan(dice).any():
        notes.append(f"dice: {int(np.isnan(dice).sum())} sample-class pairs with both masks empty left out")
    if np.isnan(hd).any():
        notes.append(f"hd95: {int(np.isnan(hd).sum())} sample-class pairs with an empty mask left out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-nan row or column is nan: intended
        dice_class = np.nanmean(dice, axis=0)
        hd_class = np.nanmean(hd, axis=0)
        per_sample = np.nanmean(dice, axis=1)
    fg = names[1:]
    return {
        "n": int(pred.shape[0]),
        "dice": {n: float(v) for n, v in zip(fg, dice_class)},
        "hd95": {n: float(v) for n, v in zip(fg, hd_class)},
        "mean_dice": nanmean(dice.ravel()),
        "mean_hd95": nanmean(hd.ravel()),
        "per_sample_dice": [float(v) for v in per_sample],
        "notes": notes,
    }


def reliability_curve(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> dict:
    """Top-label reliability diagram: confidence (max probability) in equal-width bins.

    Args:
        y_true: ``(N,)`` integer labels. y_prob: ``(N, K)`` probabilities.

    Returns keys (lists of length ``n_bins``): ``bin_edges`` (``n_bins + 1``), ``confidence``
    (mean max-probability per bin, nan if empty), ``accuracy`` (per bin, nan if empty), ``count``.

    Not ``sklearn.calibration.calibration_curve``: it drops empty bins and returns no counts, and
    the ECE and the report's diagrams need every bin with its count.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins: {n_bins} must be >= 1")
    y_true, y_prob = _check_probabilities(y_true, y_prob)
    conf = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins (0, 1/n], ...: a confidence of exactly 1 falls in the last bin.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {
        "bin_edges": edges.tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": mean_acc.tolist(),
        "count": count.tolist(),
    }


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width top-label confidence bins
    (Guo et al. 2017, eq. 3). ``y_true`` ``(N,)``, ``y_prob`` ``(N, K)``."""
    curve = reliability_curve(y_true, y_prob, n_bins)
    count = np.asarray(curve["count"], dtype=np.float64)
    gap = np.abs(np.asarray(curve["accuracy"]) - np.asarray(curve["confidence"]))
    filled = count > 0
    return float(np.sum(count[filled] / count.sum() * gap[filled]))
