"""The ``quality`` stage: fidelity, coverage, diversity and memorisation of each fold's synthetic set.

Reads ``prepared/`` (real data, fingerprint, splits), ``ddpm/fold_k/train_ids.json`` (what each
generator saw) and each fold's synthetic set as its ``manifest.json`` lists it; writes ``quality/quality.json``, the
figures and, with ``quality.drop_memorised``, ``quality/dropped.json`` (synthetic ids that the
study must leave out). Every number comes with a real-against-real reference so it has a scale.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np

from raysynth.artifacts import (
    DROPPED_JSON,
    NCC_HISTOGRAM,
    QUALITY_JSON,
    QUALITY_VERSION,
    Layout,
    generator_meta,
    generator_train_ids,
    mask_classes,
    quality_digest,
    quality_outdated,
    read_autoencoder,
    read_json,
    read_manifest,
    read_prepared,
    read_synthetic,
)
from raysynth.config import Config
from raysynth.data.schema import ImageSet
from raysynth.data.splits import holdout_split
from raysynth.errors import StageError
from raysynth.io import write_json
from raysynth.diffusion.autoencoder import load_autoencoder
from raysynth.quality.features import CHANNELS, Encoder, random_encoder, train_encoder
from raysynth.quality.memorisation import nearest_feature, nearest_ncc, privacy_gate
from raysynth.quality.reconstruction import reconstruction_metrics
from raysynth.quality.metrics import (
    effective_k,
    frechet_distance,
    kid,
    ms_ssim_diversity,
    precision_recall,
)
from raysynth.render import quality_figures as figures
from raysynth.runtime import derive_seed

logger = logging.getLogger(__name__)

COVARIANCE = "ledoit_wolf"  # per-class sets are often smaller than the feature width
KID_SUBSETS, KID_SUBSET_SIZE = 50, 1000
DIVERSITY_PAIRS = 200
CLOSEST_PAIRS = 8
NCC_CEILING_MARGIN = 1e-4
"""A gate threshold within this of 1 cannot flag a sample (NCC <= 1): the gate is inconclusive."""
COMPARISONS = {
    "reference": "real training half A vs real training half B (stratified split): the real-vs-real scale",
    "synthetic_matched": "real training half A vs a random synthetic subset of half B's size per class: "
                         "size-matched to 'reference', so the two compare directly (FD and precision/recall "
                         "depend on sample size)",
    "synthetic_vs_train": "all real training images (what the generator saw) vs all synthetic samples",
    "synthetic_vs_heldout": "the fold's held-out real images vs all synthetic samples",
    "train_vs_heldout": "held-out real vs real training images: the real-vs-real scale for synthetic_vs_heldout",
}


def assess_quality(cfg: Config, layout: Layout, force: bool = False) -> dict[str, Any]:
    """Measure every fold that has synthetic shards; write quality.json, figures and the drop list.

    Skips the work and returns the saved summary when ``quality.json`` was made with the same
    config digest (and its figures exist), unless ``force``. Raises :class:`StageError` when the
    prepared data or every fold's synthetic data is missing.
    """
    digest = quality_digest(cfg)
    out = layout.quality / QUALITY_JSON
    real, fingerprint, folds = read_prepared(layout, cfg)
    manifests = {int(f["fold"]): read_manifest(layout, int(f["fold"]), cfg=cfg) for f in folds}
    ready = [f for f in folds if manifests[int(f["fold"])] and manifests[int(f["fold"])]["shards"]]
    if not ready:
        if manifests and all(m is not None and m.get("num_samples") == 0 for m in manifests.values()):
            raise StageError("quality: every synthetic set is empty: sampling.ratio x the real training counts "
                             "rounds to 0 samples; raise sampling.ratio (study.ratios) or set sampling.num_samples")
        raise StageError(f"quality: no synthetic shards (part-*.parquet) under {layout.root / 'synthetic'}; "
                         "run `raysynth sample` first")
    missing = sorted(set(manifests) - {int(f["fold"]) for f in ready})
    if missing:
        logger.warning("quality: folds %s have no synthetic shards and are not assessed", missing)
    if not force and quality_outdated(layout, cfg, [int(f["fold"]) for f in ready]) is None:
        logger.info("quality: %s is complete for config %s; skipping (use force to redo)", out, digest)
        return read_json(out)

    class_names = list(fingerprint.get("class_names") or [str(c) for c in sorted(set(real.labels.tolist()))])
    task = fingerprint.get("task", cfg.data.task)
    q = cfg.quality
    fold_reports, hist_items = [], []
    for entry in ready:
        report, hist = _assess_fold(cfg, layout, real, class_names, entry)
        if cfg.diffusion.space == "latent":
            report["reconstruction"] = _reconstruction(cfg, layout, real, fingerprint, entry)
        fold_reports.append(report)
        hist_items.append(hist)
    figures.plot_ncc_histograms(hist_items, q.ncc_threshold, layout.quality / NCC_HISTOGRAM)

    passed = all(r["gate"]["passed"] for r in fold_reports)
    verdict = "passed" if passed else "inconclusive" if all(
        r["gate"]["passed"] or not r["gate"]["discriminates"] for r in fold_reports) else "failed"
    dropped_path = layout.quality / DROPPED_JSON
    if q.drop_memorised:
        write_json(dropped_path, {"config_digest": digest, "ncc_threshold": q.ncc_threshold,
                                  "ids": {str(r["fold"]): r["gate"]["offending_ids"] for r in fold_reports}})
    elif dropped_path.exists():
        dropped_path.unlink()  # a stale list from an earlier config must not silently thin the study
    summary = {
        "version": QUALITY_VERSION,
        "config_digest": digest,
        "seed": cfg.seed,
        "task": task,
        "dims": real.dims,
        "num_channels": real.num_channels,
        "class_names": class_names,
        "measured_on": "image channel only; segmentation masks travel with the samples but are not measured"
        if task == "segmentation" else "image",
        "privacy_passed": passed,
        "privacy_verdict": verdict,
        "privacy_passed_after_drop": True if q.drop_memorised else passed,
        "gate": {"ncc_threshold": q.ncc_threshold, "reference_quantile": q.reference_quantile,
                 "effective_thresholds": {str(r["fold"]): r["gate"]["threshold"] for r in fold_reports},
                 "max_memorised_fraction": q.max_memorised_fraction, "drop_memorised": q.drop_memorised},
        "encoder": {"kind": q.encoder, "per_fold": [
            {"fold": r["fold"], **{k: r["encoder"].get(k) for k in ("kind", "objective", "train_accuracy",
                                                                     "heldout_accuracy")}} for r in fold_reports]},
        "method": _method(cfg),
        "folds": fold_reports,
        "folds_without_synthetic": missing,
        "figures": {"ncc_hist": NCC_HISTOGRAM},
        "dropped": DROPPED_JSON if q.drop_memorised else None,
        # Latent space: what the autoencoder loses, on each fold's real test part (never used to select).
        "reconstruction": [{"fold": r["fold"], **r["reconstruction"]} for r in fold_reports if "reconstruction" in r]
        or None,
    }
    write_json(out, summary)
    logger.info("quality: wrote %s; privacy %s", out, "passed" if passed else "FAILED")
    return summary


def _reconstruction(cfg: Config, layout: Layout, real: ImageSet, fingerprint: dict, entry: dict) -> dict[str, Any]:
    """PSNR, SSIM, MS-SSIM (and mask Dice) of the fold's autoencoder on the fold's real test part."""
    fold = int(entry["fold"])
    model = load_autoencoder(read_autoencoder(layout, cfg, fold)["path"])
    test = real.subset_ids(list(entry["test"]))
    n_mask = mask_classes(cfg, fingerprint)
    metrics = reconstruction_metrics(model, test.images, test.masks if n_mask else None, n_mask)
    logger.info("quality: fold %d: autoencoder on the real test part: PSNR %.2f dB, SSIM %.3f", fold,
                metrics["psnr"], metrics["ssim"])
    return metrics


def _method(cfg: Config) -> dict[str, Any]:
    q = cfg.quality
    return {
        "encoder": f"{q.encoder}: a small CNN (conv blocks {list(CHANNELS)}, GroupNorm, SiLU, global average "
                   f"pooling, linear to {q.feature_dim} features); 'trained' fits it on the fold's real training "
                   f"images only ({q.encoder_epochs} epochs, cross-entropy; a denoising autoencoder if one class), "
                   "'random' is a fixed seeded initialisation. Features: the penultimate (feature) layer.",
        "frechet_distance": f"Gaussian fit per set with {COVARIANCE} covariance, scipy sqrtm",
        "kid": f"polynomial kernel (x.y/F + 1)^3, unbiased MMD^2, {KID_SUBSETS} subsets of up to {KID_SUBSET_SIZE}",
        "precision_recall": f"Kynkaanniemi et al. 2019 k-NN manifolds, k={q.knn} (reduced to n-1 for small sets)",
        "diversity": f"mean (MS-)SSIM over up to {DIVERSITY_PAIRS} random pairs within a set, intensities "
                     "mapped to [0, 1]; lower = more diverse; see 'diversity.*.method'",
        "memorisation": "nearest real training image by NCC (Pearson correlation of whole images) and by cosine "
                        "similarity of encoder features; reference: held-out real images to the training images",
        "comparisons": COMPARISONS,
    }


def _ids_trained_on(cfg: Config, layout: Layout, entry: dict) -> tuple[list[str], str]:
    fold = int(entry["fold"])
    generator_meta(layout, fold, cfg=cfg)  # current for this config, or an error
    ids, path = generator_train_ids(layout, fold)
    return ids, str(path.relative_to(layout.root))


def _subset(real: ImageSet, ids: list[str], what: str, fold: int) -> ImageSet:
    try:
        return real.subset_ids(ids)
    except KeyError as exc:
        raise StageError(f"quality: fold {fold} {what} ids are not in the prepared data ({exc}); "
                         "re-run `raysynth prepare` and the later stages") from None


def _compare(real_f: np.ndarray, fake_f: np.ndarray, k: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n_real": int(len(real_f)), "n_fake": int(len(fake_f))}
    if min(len(real_f), len(fake_f)) < 2:
        return {**out, "fd": None, "kid_mean": None, "kid_std": None, "precision": None, "recall": None,
                "knn": None, "note": "fewer than 2 samples on one side"}
    k_mean, k_std = kid(real_f, fake_f, KID_SUBSETS, KID_SUBSET_SIZE, seed)
    precision, recall = precision_recall(real_f, fake_f, k)
    return {**out, "fd": frechet_distance(real_f, fake_f, covariance=COVARIANCE), "kid_mean": k_mean,
            "kid_std": k_std, "precision": precision, "recall": recall, "knn": effective_k(k, len(real_f), len(fake_f))}


def _diversity(images: np.ndarray, seed: int) -> Optional[dict]:
    return ms_ssim_diversity(images, DIVERSITY_PAIRS, seed) if len(images) >= 2 else None


def effective_threshold(ncc_threshold: float, reference_quantile: Optional[float], reference: np.ndarray) -> float:
    """The gate's NCC threshold: the configured one, raised to ``reference_quantile`` of the
    held-out real scans' nearest-training NCC when that reference exists."""
    if reference_quantile is None or len(reference) == 0:
        return float(ncc_threshold)
    return float(max(ncc_threshold, np.quantile(reference, reference_quantile)))


def _summary(values: np.ndarray, threshold: Optional[float] = None) -> dict[str, Any]:
    if len(values) == 0:
        return {"n": 0}
    q = np.quantile(values, [0.5, 0.95, 0.99])
    out = {"n": int(len(values)), "mean": float(values.mean()), "median": float(q[0]), "p95": float(q[1]),
           "p99": float(q[2]), "max": float(values.max())}
    if threshold is not None:
        out["fraction_above_threshold"] = float(np.mean(values > threshold))
    return out


def _assess_fold(cfg: Config, layout: Layout, real: ImageSet, class_names: list[str], entry: dict) -> tuple[dict, dict]:
    q, fold = cfg.quality, int(entry["fold"])
    seed = derive_seed(cfg.seed, fold)
    rng = np.random.default_rng(seed)
    # 1. The data: what the generator trained on, the held-out real part, and its samples.
    train_ids, source = _ids_trained_on(cfg, layout, entry)
    leaked = set(train_ids) & set(entry["test"])
    if leaked:
        raise StageError(f"quality: fold {fold} generator trained on {len(leaked)} test ids, e.g. {sorted(leaked)[:3]}")
    train, held = _subset(real, train_ids, "training", fold), _subset(real, list(entry["test"]), "test", fold)
    if len(train) < 2:
        raise StageError(f"quality: fold {fold} has {len(train)} real training image(s); at least 2 are needed")
    synth = read_synthetic(layout, fold, cfg=cfg)
    if synth.record_shape != real.record_shape:
        raise StageError(f"quality: fold {fold} synthetic shape {synth.record_shape} (channels first) differs from "
                         f"the prepared data's {real.record_shape}; re-run `raysynth sample`")
    logger.info("quality: fold %d: %d real training, %d held-out, %d synthetic images", fold, len(train),
                len(held), len(synth))
    # 2. The encoder, fitted on real training images only.
    if q.encoder == "trained":
        encoder: Encoder = train_encoder(train.images, train.labels, real.dims, q.feature_dim, q.encoder_epochs, seed)
    else:
        encoder = random_encoder(real.dims, q.feature_dim, seed, in_channels=real.num_channels)
    encoder.description["heldout_accuracy"] = encoder.accuracy(held.images, held.labels)
    f_train, f_held, f_synth = (encoder.features(s.images) for s in (train, held, synth))
    # 3. Fidelity and coverage, each with its real-vs-real reference, overall and per class.
    # Halves grouped by subject: a patient's neighbouring slices on both sides would shrink the reference.
    half_a, half_b = holdout_split(train.labels, train.subjects, 0.5, derive_seed(seed, 1))
    matched = np.concatenate([rng.permutation(np.flatnonzero(synth.labels == c))[: int(np.sum(train.labels[half_b] == c))]
                              for c in np.unique(train.labels)]).astype(np.int64)
    groups = {"overall": None, **{_name(class_names, c): int(c) for c in sorted(set(train.labels) | set(synth.labels))}}
    metrics, diversity = {}, {}
    for name, c in groups.items():
        a, b = half_a[_of(train.labels[half_a], c)], half_b[_of(train.labels[half_b], c)]
        m, s, t, h = matched[_of(synth.labels[matched], c)], _of(synth.labels, c), _of(train.labels, c), _of(held.labels, c)
        metrics[name] = {
            "reference": _compare(f_train[a], f_train[b], q.knn, seed),
            "synthetic_matched": _compare(f_train[a], f_synth[m], q.knn, seed),
            "synthetic_vs_train": _compare(f_train[t], f_synth[s], q.knn, seed),
            "synthetic_vs_heldout": _compare(f_held[h], f_synth[s], q.knn, seed),
            "train_vs_heldout": _compare(f_train[t], f_held[h], q.knn, seed),
        }
        diversity[name] = {"synthetic": _diversity(synth.images[s], seed), "real_train": _diversity(train.images[t], seed)}
    # 4. Memorisation: nearest real training image of each sample, in pixels and in features.
    best_ncc, best_idx = nearest_ncc(synth.images, train.images)
    ref_ncc, _ = nearest_ncc(held.images, train.images) if len(held) else (np.zeros(0), None)
    feat_sim, feat_idx = nearest_feature(f_synth, f_train, "cosine")
    ref_feat, _ = nearest_feature(f_held, f_train, "cosine") if len(held) else (np.zeros(0), None)
    threshold = effective_threshold(q.ncc_threshold, q.reference_quantile, ref_ncc)
    # Held-out real scans above the same threshold: the rate a faithful generator shows too.
    reference_fraction = float(np.mean(ref_ncc > threshold)) if q.reference_quantile is not None and len(ref_ncc) else 0.0
    gate = privacy_gate(best_ncc, threshold, q.max_memorised_fraction, reference_fraction)
    gate["offending_ids"] = [synth.ids[i] for i in gate.pop("offending_indices")]
    # An NCC cannot exceed 1: at a threshold of 1 the gate flags nothing whatever the generator does.
    # That happens when held-out real images have copies in the training part (duplicates split
    # across folds); such a gate is inconclusive, never "passed".
    gate["discriminates"] = bool(threshold < 1.0 - NCC_CEILING_MARGIN)
    if not gate["discriminates"]:
        gate["passed"] = False
        gate["why"] = (f"threshold {threshold:.4f}: held-out real images reach NCC 1 with training images "
                       "(copies across the split?), so no near-copy can be flagged")
        logger.warning("quality: fold %d: the privacy gate cannot discriminate (%s)", fold, gate["why"])
    order = np.argsort(-best_ncc, kind="stable")[:CLOSEST_PAIRS]
    closest = [{"synthetic_id": synth.ids[i], "real_id": train.ids[best_idx[i]], "ncc": float(best_ncc[i]),
                "synthetic_label": _name(class_names, synth.labels[i]),
                "real_label": _name(class_names, train.labels[best_idx[i]]),
                "feature_real_id": train.ids[feat_idx[i]], "feature_cosine": float(feat_sim[i])} for i in order]
    closest_by_feature = [{"synthetic_id": synth.ids[i], "real_id": train.ids[feat_idx[i]],
                           "feature_cosine": float(feat_sim[i])}
                          for i in np.argsort(-feat_sim, kind="stable")[:CLOSEST_PAIRS]]
    pairs_png = f"nearest_pairs_fold{fold}.png"
    figures.plot_nearest_pairs(synth.images[order], train.images[best_idx[order]], best_ncc[order],
                               layout.quality / pairs_png, fold, threshold,
                               captions=[f"{p['synthetic_label']} / {p['real_label']}" for p in closest])
    per_class_ncc = {n: _summary(best_ncc[synth.labels == c], threshold) for n, c in groups.items() if c is not None}
    logger.info("quality: fold %d: %d/%d samples above NCC %.3g; gate %s", fold, gate["count"], gate["total"],
                threshold, "passed" if gate["passed"] else "FAILED" if gate["discriminates"] else "INCONCLUSIVE")
    report = {
        "fold": fold,
        "train_ids_source": source,
        "n_train": len(train), "n_heldout": len(held), "n_synthetic": len(synth),
        "generator_ids": sorted(set(synth.extra.get("generator_id", []))),
        "encoder": encoder.description,
        "metrics": metrics,
        "diversity": diversity,
        "memorisation": {
            "ncc": {"synthetic": _summary(best_ncc, threshold), "per_class": per_class_ncc,
                    "reference_heldout": _summary(ref_ncc, threshold)},
            "feature_cosine": {"synthetic": _summary(feat_sim), "reference_heldout": _summary(ref_feat),
                               "same_nearest_as_ncc": float(np.mean(feat_idx == best_idx)) if len(synth) else None},
            "closest_pairs": closest,
            "closest_pairs_by_feature": closest_by_feature,
        },
        "gate": gate,
        "figures": {"nearest_pairs": pairs_png},
    }
    return report, {"fold": fold, "synthetic": best_ncc, "reference": ref_ncc, "threshold": threshold}


def _of(labels: np.ndarray, c: Optional[int]) -> np.ndarray:
    """Boolean mask of class ``c``; every record for ``None`` (the 'overall' group)."""
    return np.ones(len(labels), bool) if c is None else labels == c


def _name(class_names: list[str], c: Any) -> str:
    c = int(c)
    name = class_names[c] if 0 <= c < len(class_names) else str(c)
    return f"class {name}" if name == "overall" else name  # never shadow the overall group


__all__ = ["assess_quality", "COMPARISONS"]
