"""Stage ``report``: the study's numbers in ``report.json``, rendered as HTML and Markdown with figures.

``report.json`` holds everything the report shows: every trial row, the summaries and paired
tests (``aggregate.py``), ROC curves and confusion matrices computed from predictions.parquet,
sample thumbnails, generator loss curves, quality, the config and package versions.
``render_from_json`` rebuilds ``report.html`` (self-contained), ``report.md`` and the PNG
figures from that file alone, so a report can be re-rendered (or audited) without the run's
other artifacts; ``raysynth report`` does only that when report.json is already up to date
with the study's results.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import time
from typing import Any

import numpy as np

from raysynth import artifacts
from raysynth.analysis import aggregate
from raysynth.analysis.robust_aggregate import robustness_section
from raysynth.artifacts import (
    REPORT_JSON,
    ROBUSTNESS_JSON,
    Layout,
    fraction_tag,
    generator_meta,
    load_predictions,
    load_results,
    load_table,
    loss_history,
    read_manifest,
    read_prepared,
    read_quality,
    read_robustness,
    read_synthetic,
    report_inputs_sha256,
    report_outdated,
)
from raysynth.config import Config
from raysynth.data.external import BUILTIN, external_source
from raysynth.data.sources import source_signature
from raysynth.design import conditions, generator_fractions
from raysynth.io import write_json
from raysynth.render.figures import encode_images as _encode
from raysynth.render.figures import image_view, middle_slice
from raysynth.render.report import THUMBNAILS, render_from_json

log = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ["accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc", "ece"]
SEGMENTATION_METRICS = ["mean_dice", "mean_hd95"]
PACKAGES = ["raysynth", "ray", "torch", "diffusers", "monai", "nibabel", "nilearn", "pyarrow", "scikit-learn", "scipy",
            "numpy", "matplotlib"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_report(cfg: Config, layout: Layout, force: bool = False) -> dict[str, Any]:
    """Build report.json from the study (unless it is already up to date, or ``force``), then render it."""
    path = layout.report / REPORT_JSON
    if report_outdated(layout) is None and not force:
        log.info("report: report.json is up to date with the study and robustness; re-rendering from it alone")
    else:
        write_json(path, build_report(cfg, layout))
    report = render_from_json(path, layout.report)
    log.info("report: %s", layout.report / "report.html")
    return report


def build_report(cfg: Config, layout: Layout) -> dict[str, Any]:
    """Everything the report shows, from the artifacts. Generators, manifests and quality.json are
    shown as recorded (each carries its own digest or generator id); the study's results are
    checked against this config, and the robustness tables against the study."""
    records, fingerprint, splits = read_prepared(layout, cfg)
    rows = [{k: v for k, v in r.items() if k != "metrics_json"} for r in load_results(layout, cfg)]
    candidates = CLASSIFICATION_METRICS if cfg.data.task == "classification" else SEGMENTATION_METRICS
    metrics = [m for m in candidates if any(r.get(m) is not None for r in rows)]
    predictions = load_predictions(layout)
    num_classes = int(fingerprint["num_classes"])
    conds = [c.name for c in conditions(cfg)]
    generators, manifests, losses = {}, {}, {}
    for s in splits:
        for p in generator_fractions(cfg):
            name = f"{s['fold']}{fraction_tag(p)}"
            if artifacts.generator_complete(cfg, layout, s["fold"], p):
                generators[name] = generator_meta(layout, s["fold"], p, cfg)
                losses[name] = _loss_history(loss_history(layout, s["fold"], p))
            m = read_manifest(layout, s["fold"], p)
            if m is not None:
                manifests[name] = {k: v for k, v in m.items() if k != "samples"}
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": cfg.data.task,
        "dims": cfg.data.dims,
        "primary_metric": cfg.study.primary_metric,
        "primary_test": aggregate.PRIMARY_TEST,
        "data": {k: fingerprint[k] for k in ("class_names", "counts", "num_records", "num_subjects", "shape", "source",
                                             "duplicates")
                 if k in fingerprint},
        "folds": len(splits),
        "design": {"arms": cfg.study.arms, "conditions": [c for c in conds if any(r["condition"] == c for r in rows)],
                   "ratios": cfg.study.ratios_for(cfg.sampling.ratio), "real_fractions": cfg.study.real_fractions,
                   "folds_per_repeat": cfg.cv.folds, "repeats": cfg.cv.repeats, "seeds": cfg.study.seeds,
                   "sizes": aggregate.sizes(rows)},
        "metrics": metrics,
        "trials": rows,
        "summary": aggregate.summarise(rows, metrics),
        "comparisons": aggregate.compare(rows, metrics),
        "roc": aggregate.roc_curves(predictions, num_classes),
        "confusion": aggregate.confusion_matrices(predictions, num_classes),
        "samples": _samples(cfg, layout, records, splits, fingerprint["class_names"]),
        "generators": generators,
        "generator_loss": losses,
        "synthetic": manifests,
        "quality": read_quality(layout),
        "robustness": _robustness(cfg, layout, rows, predictions, metrics),
        "config": cfg.to_dict(),
        "packages": package_versions(),
        "results_sha256": report_inputs_sha256(layout),
    }


def _robustness(cfg: Config, layout: Layout, rows: list[dict], predictions, metrics: list[str]):
    """The robustness section (``robust_aggregate``), or None when that stage has not run."""
    info = read_robustness(layout)
    if info is None:
        return None
    source = external_source(cfg)
    signature = source_signature(source) if source not in (None, BUILTIN) else None
    if info.get("digest") != artifacts.robustness_digest(cfg, source, signature):
        log.warning("report: %s is from another config or study; run `raysynth robustness` to include it",
                    layout.robustness / ROBUSTNESS_JSON)
        return None
    primary = cfg.study.primary_metric if cfg.study.primary_metric in metrics else metrics[0]
    return robustness_section(rows, load_table(layout, "corrupted"), load_table(layout, "external"), predictions,
                              load_table(layout, "external_predictions"), metrics, primary, info,
                              cfg.robustness.calibration_bins)


def _loss_history(rows: list[dict], max_points: int = 200) -> list[list[float]]:
    step = max(1, len(rows) // max_points)
    return [[int(r["step"]), float(r["loss_ema"])] for r in rows[::step]]


def _samples(cfg: Config, layout: Layout, records, splits: list[dict], class_names: list[str]) -> dict:
    """Thumbnails of the first split: per class, real training images, then each generator's
    samples (one row per real-data size). Middle axial slices for volumes, plus orthogonal
    slices of a few synthetic volumes."""
    fold, train = int(splits[0]["fold"]), set(splits[0]["train"])
    generated = {p: read_synthetic(layout, fold, fraction=p) for p in generator_fractions(cfg)
                 if read_manifest(layout, fold, p) is not None}
    blank = np.full(records.images.shape[1:], -1.0, np.float32)

    def row(label: str, source, idx) -> dict:
        # Thumbnails (THUMBNAILS, C', H, W): C' = 3 (RGB) for 3-channel records, else the first channel.
        idx = list(idx)[:THUMBNAILS]
        images = np.stack([image_view(source.images[i]) for i in idx] +
                          [image_view(blank)] * (THUMBNAILS - len(idx)))
        out = {"label": label, "images": _encode(images), "masks": None, "count": len(idx)}  # the rest is padding
        if source.masks is not None:
            zero = np.zeros(images.shape[2:], np.uint8)
            masks = np.stack([middle_slice(source.masks[i]) for i in idx] + [zero] * (THUMBNAILS - len(idx)))
            out["masks"] = _encode(masks, scale=False)
        return out

    rows = []
    for c, name in enumerate(class_names):
        rows.append(row(f"{name}: real", records, [i for i in np.flatnonzero(records.labels == c) if records.ids[i] in train]))
        for p, syn in generated.items():
            if syn is not None and (syn.labels == c).any():
                rows.append(row(f"{name}: synthetic {p:.0%}", syn, np.flatnonzero(syn.labels == c)))
    out: dict[str, Any] = {"fold": fold, "rows": rows, "orthogonal": None}
    full = generated.get(1.0)
    if cfg.data.dims == 3 and full is not None:
        vols = full.images[:6]
        out["orthogonal"] = {"images": [_encode(np.stack([image_view(v, a) for v in vols])) for a in range(3)],
                             "masks": None if full.masks is None else
                             [_encode(np.stack([middle_slice(m, a) for m in full.masks[:6]]), scale=False) for a in range(3)]}
    return out
