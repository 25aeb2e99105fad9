"""The report rendered from report.json alone: its figures, ``report.html`` (self-contained) and ``report.md``.

Rendering never reads another artifact, so a report can be re-rendered (or audited) from its JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from raysynth.errors import StageError
from raysynth.io import strict, write_bytes, write_text
from raysynth.render import figures
from raysynth.render import robust_figures as rf
from raysynth.render.document import build_document
from raysynth.render.figures import decode_images as _decode
from raysynth.render.html import render_html, render_markdown
from raysynth.render.text import num, primary_metric

THUMBNAILS = 8
"""Real and synthetic samples shown per class and generator."""


def report_figures(report: dict) -> dict[str, bytes]:
    """Every figure of the report, as PNG bytes, drawn from report.json alone."""
    images: dict[str, bytes] = {}
    metrics = report["metrics"]
    primary = primary_metric(report) or None
    conds = report["design"]["conditions"]
    for m in dict.fromkeys(m for m in (primary, "auc") if m in metrics and len(report["design"]["sizes"]) > 1):
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
            present=[j < r.get("count", THUMBNAILS) for r in rows for j in range(THUMBNAILS)],
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


RESULT_SECTIONS = ("summary", "comparisons", "roc", "generator_loss")
"""The numeric sections of report.json, where a null is a value that is not defined (NaN)."""


def _nan_for_null(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _nan_for_null(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_nan_for_null(v) for v in node]
    return float("nan") if node is None else node


def render_from_json(source: dict | str | Path, out_dir: str | Path) -> dict:
    """Write report.html, report.md and the PNG figures into ``out_dir`` from a report.json
    (a path, or its loaded dict). Returns the report. Deterministic: the same report.json gives
    byte-identical files."""
    if isinstance(source, dict):
        report = json.loads(json.dumps(strict(source)))  # what a reader of the file would see
    else:
        if not Path(source).is_file():
            raise StageError(f"report: no report.json at {source}; run `raysynth report` after the study")
        report = json.loads(Path(source).read_text())
    missing = {"design", "summary", "comparisons", "roc", "confusion", "samples"} - set(report)
    if missing:
        raise StageError(f"report: report.json lacks {sorted(missing)} (written by an older raysynth); "
                         "rerun `raysynth report` with the study's results present")
    for key in RESULT_SECTIONS:  # report.json stores NaN as null: the renderers compute with NaN
        if key in report:
            report[key] = _nan_for_null(report[key])
    images = report_figures(report)
    title, blocks = build_document(report, set(images))
    out = Path(out_dir)
    for name, png in images.items():
        write_bytes(out / name, png)
    write_text(out / "report.md", render_markdown(blocks))
    write_text(out / "report.html", render_html(blocks, images, title))
    return report


def summary_lines(report: dict) -> list[str]:
    """The short summary printed at the end of a run: the primary metric per condition and size,
    and each condition against baseline with the primary (corrected) test."""
    lines = []
    primary = primary_metric(report)
    for p in sorted(report["summary"], key=float, reverse=True):
        for c, by_metric in report["summary"][p].items():
            if primary in by_metric:
                s = by_metric[primary]
                lines.append(f"real {float(p):>4.0%} {c:>24}: {primary} {num(s['mean'], '.3f')} "
                             f"(sd {num(s.get('sd'), '.3f')}, {s['n_splits']} splits)")
        for c, by_metric in report["comparisons"].get(p, {}).items():
            r = by_metric.get(primary, {})
            if "mean_diff" in r:
                lines.append(f"real {float(p):>4.0%} {c} - baseline: {num(r['mean_diff'], '+.3f')} "
                             f"[corrected 95% CI {num(r.get('nb_ci_low'), '+.3f')}, {num(r.get('nb_ci_high'), '+.3f')}], "
                             f"corrected t p={num(r.get('nb_p'), '.3g')} (Holm {num(r.get('nb_p_holm'), '.3g')}), "
                             f"paired t p={num(r.get('t_p'), '.3g')}")
    q = report.get("quality")
    if q and "privacy_passed" in q:
        verdict = q.get("privacy_verdict") or ("passed" if q["privacy_passed"] else "failed")
        lines.append(f"privacy gate: {verdict if verdict == 'passed' else verdict.upper()}")
    return lines
