"""The report's robustness, generalisation and calibration figures, drawn from report.json alone.

Each function takes a part of ``report["robustness"]`` (``robust_aggregate.robustness_section``)
and returns deterministic PNG bytes (``figures.png_bytes``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from raysynth.render.figures import decode_images, plt, png_bytes, show
from raysynth.render.text import metric_label, num


def _colours(conditions: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {c: cmap(i % 10) for i, c in enumerate(conditions)}


def severity_curves_png(curves: dict, metric: str, conditions: Sequence[str]) -> bytes:
    """Rows: real-data sizes; columns: corruptions. Each panel: ``metric`` (mean over splits,
    corrected 95% CI) against severity, 0 being the clean test part, one line per condition."""
    corruptions = list(curves)
    fractions = sorted({p for c in curves.values() for s in c.values() for p in s}, key=float, reverse=True)
    colours = _colours(conditions)
    fig, axes = plt.subplots(len(fractions), len(corruptions), figsize=(1.9 * len(corruptions) + 1.6, 2.2 * len(fractions) + 0.5),
                             squeeze=False, sharey=True, layout="constrained")
    for row, p in enumerate(fractions):
        for col, c in enumerate(corruptions):
            ax = axes[row, col]
            levels = sorted(curves[c], key=int)
            for i, cond in enumerate(conditions):
                pts = [(int(s), curves[c][s][p][cond][metric]) for s in levels
                       if cond in curves[c][s].get(p, {}) and metric in curves[c][s][p][cond]]
                if not pts:
                    continue
                x = np.array([q[0] for q in pts]) + (i - (len(conditions) - 1) / 2) * 0.08
                y = np.array([q[1]["mean"] for q in pts])
                low = np.array([q[1]["nb_ci_low"] for q in pts], dtype=float)
                high = np.array([q[1]["nb_ci_high"] for q in pts], dtype=float)
                err = np.vstack([np.nan_to_num(y - low), np.nan_to_num(high - y)])
                ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, lw=1.1, color=colours[cond],
                            label=cond if row == 0 and col == 0 else None)
            ax.set_xticks([int(s) for s in levels], ["clean" if s == "0" else s for s in levels], fontsize=6)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(c, fontsize=8)
            if row == len(fractions) - 1:
                ax.set_xlabel("severity", fontsize=7)
        axes[row, 0].set_ylabel(f"{metric_label(metric)}\nreal data {float(p):.0%}", fontsize=7)
    fig.legend(fontsize=7, loc="outside right upper")
    fig.suptitle(f"{metric_label(metric)} on corrupted test parts (mean over splits, corrected 95% CI)", fontsize=9)
    return png_bytes(fig)


def mce_png(mce: dict, metric: str) -> bytes:
    """Per real-data size, each condition's mean corruption error (mCE) and relative mCE, both
    relative to baseline (= 1, dashed): below the line is sturdier than baseline."""
    fractions = sorted(mce, key=float, reverse=True)
    fig, axes = plt.subplots(1, len(fractions), figsize=(max(4.5, 3.8 * len(fractions)), 3.4), squeeze=False,
                             sharey=True, layout="constrained")
    for ax, p in zip(axes[0], fractions):
        conds = list(mce[p])
        x = np.arange(len(conds))
        # None (undefined: e.g. a baseline that no corruption degraded) draws no bar.
        ax.bar(x - 0.2, [np.nan if mce[p][c]["mce"] is None else mce[p][c]["mce"] for c in conds], 0.4, label="mCE")
        ax.bar(x + 0.2, [np.nan if mce[p][c]["relative_mce"] is None else mce[p][c]["relative_mce"] for c in conds],
               0.4, label="relative mCE")
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_xticks(x, conds, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"real data {float(p):.0%}", fontsize=9)
    axes[0, 0].set_ylabel("relative to baseline")
    axes[0, 0].legend(fontsize=7)
    # Two lines: at one real-data size the figure is 4.5 in wide, too narrow for the title on one line.
    fig.suptitle(f"mean corruption error of {metric_label(metric)}\n(ImageNet-C style; baseline = 1)", fontsize=9)
    return png_bytes(fig)


def external_scatter_png(internal: dict, external: dict, metric: str, conditions: Sequence[str]) -> bytes:
    """Each condition (colour) and real-data size (marker): ``metric`` on the internal test parts
    (x) against the external test set (y), means over splits with corrected 95% intervals. Points
    below the diagonal lose performance off-site."""
    colours = _colours(conditions)
    markers = "osD^v<>P*X"
    fractions = sorted(set(internal) & set(external), key=float, reverse=True)
    fig, ax = plt.subplots(figsize=(5.6, 4.4), layout="constrained")
    values = []
    for j, p in enumerate(fractions):
        for cond in conditions:
            a, b = internal[p].get(cond, {}).get(metric), external[p].get(cond, {}).get(metric)
            if not a or not b:
                continue
            xerr = [[max(a["mean"] - a["nb_ci_low"], 0)], [max(a["nb_ci_high"] - a["mean"], 0)]]
            yerr = [[max(b["mean"] - b["nb_ci_low"], 0)], [max(b["nb_ci_high"] - b["mean"], 0)]]
            ax.errorbar([a["mean"]], [b["mean"]], xerr=np.nan_to_num(xerr), yerr=np.nan_to_num(yerr), capsize=2,
                        marker=markers[j % len(markers)], color=colours[cond], lw=0.8,
                        label=f"{cond}, real {float(p):.0%}")
            values += [a["mean"], b["mean"], *(v for v in (a["nb_ci_low"], a["nb_ci_high"], b["nb_ci_low"],
                                                            b["nb_ci_high"]) if np.isfinite(v))]
    if values:
        lo, hi = min(values) - 0.02, max(values) + 0.02
        ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xlabel(f"{metric_label(metric)}, internal test parts")
    ax.set_ylabel(f"{metric_label(metric)}, external test set")
    ax.set_title("internal against external (mean over splits, corrected 95% CI)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return png_bytes(fig)


def reliability_png(calibration: dict, where: str) -> bytes:
    """Reliability diagrams, one panel per real-data size: accuracy against mean confidence per
    bin, one line per condition (ECE in the legend), the diagonal being perfect calibration."""
    fractions = sorted(calibration, key=float, reverse=True)
    fig, axes = plt.subplots(1, len(fractions), figsize=(max(4.2, 3.8 * len(fractions)), 4.0), squeeze=False,
                             layout="constrained")
    for ax, p in zip(axes[0], fractions):
        for cond, curve in calibration[p].items():
            conf = np.array([np.nan if v is None else v for v in curve["confidence"]], dtype=float)
            acc = np.array([np.nan if v is None else v for v in curve["accuracy"]], dtype=float)
            keep = ~np.isnan(conf)
            ax.plot(conf[keep], acc[keep], marker="o", ms=3, lw=1.1, label=f"{cond} (ECE {num(curve['ece'], '.3f')})")
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence (max probability)")
        ax.set_title(f"real data {float(p):.0%}", fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
    axes[0, 0].set_ylabel("accuracy")
    fig.suptitle(f"reliability on the {where} (pooled over splits and seeds)", fontsize=9)
    return png_bytes(fig)


def corruption_examples_png(examples: dict, severities: Sequence[int]) -> bytes:
    """One real test image, clean and under every corruption (rows) and severity (columns)."""
    rows = list(examples["rows"])
    cols = len(severities) + 1
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.25 * cols + 0.8, 1.25 * len(rows) + 0.4), squeeze=False)
    clean = decode_images(examples["clean"])
    for r, name in enumerate(rows):
        images = [clean, *decode_images(examples["rows"][name])]
        for c, image in enumerate(images):
            ax = axes[r, c]
            show(ax, image)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("clean" if c == 0 else f"severity {severities[c - 1]}", fontsize=7)
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"test image of split {examples['fold']} as the models saw it", fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def external_examples_png(examples: dict) -> bytes:
    """A few external test images per class."""
    decoded = {n: decode_images(blob) for n, blob in examples.items()}
    names = list(decoded)
    cols = max(len(v) for v in decoded.values())
    fig, axes = plt.subplots(len(names), cols, figsize=(1.3 * cols + 0.8, 1.3 * len(names) + 0.3), squeeze=False)
    for r, n in enumerate(names):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(decoded[n]):
                show(ax, decoded[n][c])
        axes[r, 0].set_ylabel(n, fontsize=7)
    fig.suptitle("external test set, per class", fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)
