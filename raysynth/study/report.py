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

import hashlib
import importlib.metadata
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from raysynth.config import Config
from raysynth.errors import StageError
from raysynth.layout import Layout, fraction_tag, read_json, write_json
from raysynth.study import aggregate, figures
from raysynth.study.design import conditions, generator_fractions
from raysynth.study.figures import decode_images as _decode
from raysynth.study.figures import encode_images as _encode

log = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ["accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc", "ece"]
SEGMENTATION_METRICS = ["mean_dice", "mean_hd95"]
PACKAGES = ["raysynth", "ray", "torch", "diffusers", "monai", "nibabel", "nilearn", "pyarrow", "scikit-learn", "scipy",
            "numpy", "matplotlib"]
THUMBNAILS = 8
"""Real and synthetic samples shown per class and generator."""


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_report(cfg: Config, layout: Layout) -> dict[str, Any]:
    """Build report.json from the study (unless it is already up to date), then render it."""
    path = layout.report / "report.json"
    results = layout.study / "results.parquet"
    if path.is_file() and (not results.is_file() or read_json(path).get("results_sha256") == _inputs_sha256(layout)):
        log.info("report: report.json is up to date with the study and robustness; re-rendering from it alone")
    else:
        write_json(path, build_report(cfg, layout))
    report = render_from_json(path, layout.report)
    log.info("report: %s", layout.report / "report.html")
    return report


def build_report(cfg: Config, layout: Layout) -> dict[str, Any]:
    from raysynth.data.prepare import load_prepared
    from raysynth.study.cv import load_predictions, load_results

    records, fingerprint, splits = load_prepared(layout)
    rows = [{k: v for k, v in r.items() if k != "metrics_json"} for r in load_results(layout)]
    candidates = CLASSIFICATION_METRICS if cfg.data.task == "classification" else SEGMENTATION_METRICS
    metrics = [m for m in candidates if any(r.get(m) is not None for r in rows)]
    predictions = load_predictions(layout)
    num_classes = int(fingerprint["num_classes"])
    conds = [c.name for c in conditions(cfg)]
    generators, manifests, losses = {}, {}, {}
    for s in splits:
        for p in generator_fractions(cfg):
            name = f"{s['fold']}{fraction_tag(p)}"
            if (layout.ddpm(s["fold"], p) / "config.json").is_file():
                generators[name] = read_json(layout.ddpm(s["fold"], p) / "config.json")
                losses[name] = _loss_history(layout.ddpm(s["fold"], p) / "metrics.jsonl")
            if (layout.synthetic(s["fold"], p) / "manifest.json").is_file():
                m = read_json(layout.synthetic(s["fold"], p) / "manifest.json")
                manifests[name] = {k: v for k, v in m.items() if k != "samples"}
    quality_path = layout.quality / "quality.json"
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": cfg.data.task,
        "dims": cfg.data.dims,
        "primary_metric": cfg.study.primary_metric,
        "primary_test": aggregate.PRIMARY_TEST,
        "data": {k: fingerprint[k] for k in ("class_names", "counts", "num_records", "num_subjects", "shape", "source")
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
        "quality": read_json(quality_path) if quality_path.is_file() else None,
        "robustness": _robustness(cfg, layout, rows, predictions, metrics),
        "config": cfg.to_dict(),
        "packages": package_versions(),
        "results_sha256": _inputs_sha256(layout),
    }


def _inputs_sha256(layout: Layout) -> str:
    """Hash of the study's results and the robustness stage's tables: report.json is current
    while it matches."""
    h = hashlib.sha256()
    for path in (layout.study / "results.parquet", layout.robustness / "robustness.json",
                 layout.robustness / "corrupted.parquet", layout.robustness / "external.parquet"):
        if path.is_file():
            h.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _robustness(cfg: Config, layout: Layout, rows: list[dict], predictions, metrics: list[str]):
    """The robustness section (``robust_aggregate``), or None when that stage has not run."""
    from raysynth.study.robust_aggregate import robustness_section
    from raysynth.study.robustness import load_table, robustness_digest

    info_path = layout.robustness / "robustness.json"
    if not info_path.is_file():
        return None
    info = read_json(info_path)
    if info.get("digest") != robustness_digest(cfg):
        log.warning("report: %s is from another config or study; run `raysynth robustness` to include it", info_path)
        return None
    primary = cfg.study.primary_metric if cfg.study.primary_metric in metrics else metrics[0]
    return robustness_section(rows, load_table(layout, "corrupted"), load_table(layout, "external"), predictions,
                              load_table(layout, "external_predictions"), metrics, primary, info,
                              cfg.robustness.calibration_bins)


def _loss_history(path: Path, max_points: int = 200) -> list[list[float]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // max_points)
    return [[int(r["step"]), float(r["loss_ema"])] for r in rows[::step]]


def _samples(cfg: Config, layout: Layout, records, splits: list[dict], class_names: list[str]) -> dict:
    """Thumbnails of the first split: per class, real training images, then each generator's
    samples (one row per real-data size). Middle axial slices for volumes, plus orthogonal
    slices of a few synthetic volumes."""
    from raysynth.diffusion.sample import read_synthetic
    from raysynth.study.figures import middle_slice

    fold, train = int(splits[0]["fold"]), set(splits[0]["train"])
    generated = {p: read_synthetic(layout, fold, fraction=p) for p in generator_fractions(cfg)
                 if (layout.synthetic(fold, p) / "manifest.json").is_file()}
    blank = np.full(records.images.shape[1:], -1.0, np.float32)

    def row(label: str, source, idx) -> dict:
        idx = list(idx)[:THUMBNAILS]
        images = np.stack([middle_slice(source.images[i]) for i in idx] +
                          [middle_slice(blank)] * (THUMBNAILS - len(idx)))
        out = {"label": label, "images": _encode(images), "masks": None}
        if source.masks is not None:
            zero = np.zeros(images.shape[1:], np.uint8)
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
        out["orthogonal"] = {"images": [_encode(np.stack([middle_slice(v, a) for v in vols])) for a in range(3)],
                             "masks": None if full.masks is None else
                             [_encode(np.stack([middle_slice(m, a) for m in full.masks[:6]]), scale=False) for a in range(3)]}
    return out


# ---- rendering ------------------------------------------------------------------------------

def report_figures(report: dict) -> dict[str, bytes]:
    """Every figure of the report, as PNG bytes, drawn from report.json alone."""
    images: dict[str, bytes] = {}
    metrics = report["metrics"]
    primary = report["primary_metric"] if report["primary_metric"] in metrics else (metrics or [None])[0]
    conds = report["design"]["conditions"]
    for m in dict.fromkeys(m for m in (primary, "auc") if m in metrics):
        images[f"learning_curve_{m}.png"] = figures.learning_curve_png(report["summary"], report["design"]["sizes"], m, conds)
    if primary and any(primary in c for by_c in report["comparisons"].values() for c in by_c.values()):
        images["paired_differences.png"] = figures.paired_differences_png(report["comparisons"], primary)
    if report["roc"]:
        images["roc.png"] = figures.roc_png(report["roc"])
    if report["confusion"]:
        images["confusion.png"] = figures.confusion_png(report["confusion"], report["data"]["class_names"])
    samples = report.get("samples") or {}
    if samples.get("rows"):
        rows = samples["rows"]
        masks = [r["masks"] for r in rows]
        images["real_vs_synthetic.png"] = figures.grid_png(
            np.concatenate([_decode(r["images"]) for r in rows]),
            np.concatenate([_decode(m, scale=False) for m in masks]) if all(m is not None for m in masks) else None,
            columns=THUMBNAILS, row_labels=[r["label"] for r in rows],
            title=f"real training images and synthetic samples of split {samples['fold']}, per class")
    if samples.get("orthogonal"):
        o = samples["orthogonal"]
        images["synthetic_volumes.png"] = figures.orthogonal_png(
            [_decode(b) for b in o["images"]], None if o["masks"] is None else [_decode(b, scale=False) for b in o["masks"]],
            title="synthetic volumes: axial, coronal, sagittal middle slices")
    if any(report["generator_loss"].values()):
        images["generator_loss.png"] = figures.loss_curves_png(report["generator_loss"])
    if report.get("robustness"):
        images.update(robustness_figures(report["robustness"], conds))
    return images


def robustness_figures(rb: dict, conditions: list[str]) -> dict[str, bytes]:
    """The robustness section's figures (``robust_figures``), by file name."""
    from raysynth.study import robust_figures as rf

    images: dict[str, bytes] = {}
    metric = rb["primary"]
    if rb.get("examples"):
        images["corruption_examples.png"] = rf.corruption_examples_png(rb["examples"], rb["severities"])
    if rb.get("curves"):
        images["severity_curves.png"] = rf.severity_curves_png(rb["curves"], metric, conditions)
    if rb.get("mce"):
        images["mce.png"] = rf.mce_png(rb["mce"], metric)
    if rb.get("external"):
        internal = next(iter(rb["curves"].values()))["0"] if rb.get("curves") else None
        if internal:
            images["external_vs_internal.png"] = rf.external_scatter_png(internal, rb["external"]["summary"], metric,
                                                                        conditions)
    if rb.get("external_examples") and any(rb["external_examples"].values()):
        images["external_examples.png"] = rf.external_examples_png(rb["external_examples"])
    for where in ("clean", "external"):
        if rb.get("calibration", {}).get(where):
            images[f"reliability_{where}.png"] = rf.reliability_png(
                rb["calibration"][where], "real test parts" if where == "clean" else "external test set")
    return images


def render_from_json(source: dict | str | Path, out_dir: str | Path) -> dict:
    """Write report.html, report.md and the PNG figures into ``out_dir`` from a report.json
    (a path, or its loaded dict). Returns the report. Deterministic: the same report.json gives
    byte-identical files."""
    from raysynth.study.document import build_document
    from raysynth.study.html import render_html, render_markdown

    if isinstance(source, dict):
        report = json.loads(json.dumps(source))  # what a reader of the file would see
    else:
        if not Path(source).is_file():
            raise StageError(f"report: no report.json at {source}; run `raysynth report` after the study")
        report = json.loads(Path(source).read_text())
    missing = {"design", "summary", "comparisons", "roc", "confusion", "samples"} - set(report)
    if missing:
        raise StageError(f"report: report.json lacks {sorted(missing)} (written by an older raysynth); "
                         "rerun `raysynth report` with the study's results present")
    images = report_figures(report)
    title, blocks = build_document(report, set(images))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in images.items():
        (out / name).write_bytes(png)
    (out / "report.md").write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks, images, title))
    return report


def summary_lines(report: dict) -> list[str]:
    """The short summary printed at the end of a run: the primary metric per condition and size,
    and each condition against baseline with the primary (corrected) test."""
    lines = []
    metrics = report["metrics"]
    primary = report["primary_metric"] if report["primary_metric"] in metrics else (metrics or [""])[0]
    for p in sorted(report["summary"], key=float, reverse=True):
        for c, by_metric in report["summary"][p].items():
            if primary in by_metric:
                s = by_metric[primary]
                lines.append(f"real {float(p):>4.0%} {c:>24}: {primary} {s['mean']:.3f} (sd {s['sd']:.3f}, "
                             f"{s['n_splits']} splits)")
        for c, by_metric in report["comparisons"].get(p, {}).items():
            r = by_metric.get(primary, {})
            if "mean_diff" in r:
                lines.append(f"real {float(p):>4.0%} {c} - baseline: {r['mean_diff']:+.3f} "
                             f"[corrected 95% CI {r['nb_ci_low']:+.3f}, {r['nb_ci_high']:+.3f}], "
                             f"corrected t p={r.get('nb_p', float('nan')):.3g} (Holm {r.get('nb_p_holm', float('nan')):.3g}), "
                             f"paired t p={r.get('t_p', float('nan')):.3g}")
    q = report.get("quality")
    if q and "privacy_passed" in q:
        lines.append(f"privacy gate: {'passed' if q['privacy_passed'] else 'FAILED'}")
    return lines
