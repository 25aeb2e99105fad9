"""Scoring the study's trained networks on corrupted copies of a split's test part and on an external set.

Runs as one Ray task per split (imports library modules only). The corruption draws are seeded by
(split, corruption, severity) alone, so every arm and seed of a split sees the same corrupted
images and the comparisons stay paired.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from raysynth.artifacts import Layout, read_prepared
from raysynth.config import Config, from_dict
from raysynth.downstream.augment import CORRUPTIONS, build_corruption
from raysynth.downstream.models import evaluate, load_network
from raysynth.runtime import derive_seed, set_threads

log = logging.getLogger(__name__)

CLASSIFICATION_SCALARS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc", "ece")
SEGMENTATION_SCALARS = ("mean_dice", "mean_hd95")
KEY_FIELDS = ("condition", "arm", "ratio", "real_fraction", "fold", "repeat", "seed", "n_real", "n_synthetic", "n_test")


def corruption_seed(base: int, fold: int, corruption: str, severity: int) -> int:
    """The seed of one (split, corruption, severity): shared by every arm and seed of the split."""
    return derive_seed(base, fold, CORRUPTIONS.index(corruption), severity) % 2**32


def corrupt_test_part(cfg: Config, fold: int, images: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """``{(corruption, severity): corrupted copy of images}`` for every configured pair."""
    rb = cfg.robustness
    return {(c, s): build_corruption(c, s, corruption_seed(rb.seed, fold, c, s), cfg.data.dims)(images)
            for c in rb.corruptions for s in sorted(rb.severities)}


def _scalars(metrics: dict, task: str) -> dict[str, float]:
    names = SEGMENTATION_SCALARS if task == "segmentation" else CLASSIFICATION_SCALARS
    return {k: float(metrics[k]) for k in names if isinstance(metrics.get(k), (int, float))}


def evaluate_split(cfg_dict: dict, root: str, fold: int, trials: list[dict], external: Any) -> dict:
    """Score every network of one split on its corrupted test part and on ``external`` (an
    ImageSet or None). Returns ``{"fold", "corrupted": rows, "external": rows, "predictions": rows}``."""
    cfg = from_dict(cfg_dict)
    set_threads(cfg.study.cpus_per_trial)
    layout = Layout.at(root)
    records, fingerprint, splits = read_prepared(layout, cfg)
    split = next(s for s in splits if int(s["fold"]) == fold)
    test = records.subset_ids(split["test"])
    task = cfg.data.task
    device = "cuda" if torch.cuda.is_available() and cfg.study.gpus_per_trial > 0 else "cpu"
    t0 = time.time()
    corrupted = corrupt_test_part(cfg, fold, test.images)
    log.info("robustness: split %d: %d corrupted copies of %d test images in %.1fs", fold, len(corrupted),
             len(test), time.time() - t0)
    common = dict(num_classes=int(fingerprint["num_classes"]),
                  num_mask_classes=int(fingerprint.get("num_mask_classes") or 0) or None,
                  batch_size=max(cfg.study.batch_size, 64), device=device, class_names=fingerprint["class_names"],
                  mask_class_names=fingerprint.get("mask_names"))
    out: dict[str, Any] = {"fold": fold, "corrupted": [], "external": [], "predictions": []}
    for trial in trials:
        model, spec = load_network(layout.root / trial["model"], device)
        key = {k: trial[k] for k in KEY_FIELDS}
        for (c, s), images in corrupted.items():
            result = evaluate(model, task, test, images=images, **common)
            out["corrupted"].append({**key, "corruption": c, "severity": s, **_scalars(result["metrics"], task)})
        if external is not None:
            result = evaluate(model, task, external, **common)
            # n_test is the external set's size here: the size of the test behind each estimate.
            out["external"].append({**key, "n_test": len(external), "n_external": len(external),
                                    **_scalars(result["metrics"], task)})
            if result["y_prob"] is not None:
                out["predictions"] += [{**key, "id": rid, "y_true": int(y), "y_prob": [float(v) for v in p]}
                                       for rid, y, p in zip(external.ids, result["y_true"], result["y_prob"])]
    out["seconds"] = time.time() - t0
    return out
