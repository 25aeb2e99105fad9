"""Curation: keep a synthetic sample only when a network trained on real data agrees with it.

``sampling.curate`` (issue 16). For one generator, a *curator* (the study's own network, trained
with the study's schedule) is fit on the real training part that generator was trained on,
the fold's training part or its real-fraction subset, never a test part. Each synthetic sample
gets a score:

* classification: the curator's probability of the sample's conditioning label;
* segmentation: the Dice between the curator's mask and the generated mask, over the foreground
  classes present in either (1 when both are empty).

A sample is kept when its score is at least ``threshold``. Runs inside a Ray task (imports
library modules only).
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from raysynth.artifacts import Layout, curation_digest, read_manifest, read_prepared, read_subsets, read_synthetic
from raysynth.config import from_dict
from raysynth.data.schema import ImageSet
from raysynth.downstream.models import predict, train_network
from raysynth.runtime import set_threads


def mask_agreement(predicted: np.ndarray, generated: np.ndarray, num_mask_classes: int) -> np.ndarray:
    """Per sample, the mean Dice over the foreground classes present in either mask; 1 where both
    are all background (the curator agrees there is nothing)."""
    n = len(predicted)
    p, g = predicted.reshape(n, -1), generated.reshape(n, -1)
    scores = np.ones(n, dtype=np.float64)
    for i in range(n):
        dice = []
        for c in range(1, num_mask_classes):
            a, b = p[i] == c, g[i] == c
            total = int(a.sum()) + int(b.sum())
            if total:
                dice.append(2.0 * int((a & b).sum()) / total)
        if dice:
            scores[i] = float(np.mean(dice))
    return scores


def curation_scores(task: str, curator, synthetic: ImageSet, *, num_mask_classes: Optional[int],
                    batch_size: int, device: str = "cpu") -> np.ndarray:
    """Each synthetic sample's score under a trained ``curator`` (see the module's docstring)."""
    out = predict(curator, task, synthetic.images, batch_size=batch_size, device=device)
    if task == "segmentation":
        if synthetic.masks is None:
            raise ValueError("curation: segmentation samples carry no masks")
        return mask_agreement(out, synthetic.masks, int(num_mask_classes or 2))
    return out[np.arange(len(synthetic)), synthetic.labels.astype(int)]


def curate(task: str, real: ImageSet, synthetic: ImageSet, *, threshold: float, num_classes: int,
           num_mask_classes: Optional[int], epochs: int, batch_size: int, learning_rate: float, width: int,
           seed: int, device: str = "cpu") -> dict:
    """Train the curator on ``real`` and score ``synthetic``. Returns the record written to
    ``curation.json``: the threshold, the ids the curator trained on, every sample's score, the
    ids dropped, and kept/scored counts per class."""
    t0 = time.perf_counter()
    curator = train_network(task, real, num_classes=num_classes, num_mask_classes=num_mask_classes, epochs=epochs,
                            batch_size=batch_size, learning_rate=learning_rate, width=width, seed=seed, device=device)
    scores = curation_scores(task, curator, synthetic, num_mask_classes=num_mask_classes, batch_size=batch_size,
                             device=device)
    keep = scores >= threshold
    labels = synthetic.labels.astype(int)
    per_class = {int(c): {"scored": int((labels == c).sum()), "kept": int((keep & (labels == c)).sum())}
                 for c in range(num_classes)}
    return {
        "task": task,
        "threshold": float(threshold),
        "score": "label probability" if task == "classification" else "Dice with the generated mask",
        "trained_on": list(real.ids),
        "num_scored": int(len(scores)),
        "num_kept": int(keep.sum()),
        "per_class": per_class,
        "score_quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.05", "0.25", "0.5", "0.75", "0.95")}
        if len(scores) else {},
        "scores": dict(zip(synthetic.ids, map(float, scores))),
        "dropped": [sid for sid, k in zip(synthetic.ids, keep) if not k],
        "seconds": time.perf_counter() - t0,
    }


def curate_generator(cfg_dict: dict, root: str, fold: int, fraction: float) -> dict:
    """Ray task body: curate the (fold, fraction) synthetic set, the curator trained on that
    generator's own real training subset (``prepared/subsets.json``). Returns the record, with its
    digest (:func:`raysynth.artifacts.curation_digest`); the sample stage writes it."""
    cfg = from_dict(cfg_dict)
    st, cur = cfg.study, cfg.sampling.curate
    set_threads(st.cpus_per_trial)
    layout = Layout.at(root)
    records, fingerprint, splits = read_prepared(layout, cfg)
    real = records.subset_ids(read_subsets(layout, cfg)[fold][fraction])
    test = set(next(s for s in splits if s["fold"] == fold)["test"])
    if test & set(real.ids):  # the subsets come from the training part; this guards the rule itself
        raise ValueError(f"curation: fold {fold}'s curator would train on test images")
    manifest = read_manifest(layout, fold, fraction, cfg)
    synthetic = read_synthetic(layout, fold, fraction=fraction)
    record = {"fold": fold, "fraction": fraction, "digest": curation_digest(cfg, manifest), "epochs": cur.epochs or st.epochs}
    if synthetic is None:
        return {**record, "threshold": cur.threshold, "trained_on": list(real.ids), "num_scored": 0, "num_kept": 0,
                "per_class": {}, "scores": {}, "dropped": []}
    result = curate(cfg.data.task, real, synthetic, threshold=cur.threshold,
                    num_classes=int(fingerprint["num_classes"]),
                    num_mask_classes=int(fingerprint.get("num_mask_classes") or 0) or None,
                    epochs=cur.epochs or st.epochs, batch_size=st.batch_size, learning_rate=st.lr_for(cfg.data.task),
                    width=st.width, seed=cfg.seed + 7919 * (fold + 1),
                    device="cuda" if torch.cuda.is_available() and st.gpus_per_trial > 0 else "cpu")
    return {**record, **result}
