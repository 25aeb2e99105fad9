"""Figures shared by the stages: sample grids, and the report's plots (matplotlib, Agg).

The report's figures are drawn from report.json alone and returned as PNG bytes (no timestamp
in the metadata), so re-rendering a report gives byte-identical images.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raysynth.render.text import metric_label, num


def middle_slice(image: np.ndarray, axis: int = 0) -> np.ndarray:
    """A 2D view of one spatial array: a 2D image or mask ``(H, W)`` as it is, or the middle slice
    of a volume ``(D, H, W)`` along ``axis``. For images with a channel axis see :func:`image_view`."""
    if image.ndim == 2:
        return image
    if image.ndim != 3:
        raise ValueError(f"middle_slice: expected (H, W) or (D, H, W), got {image.shape}")
    return np.take(image, image.shape[axis] // 2, axis=axis)


def shown_channels(num_channels: int) -> int:
    """How many channels a figure shows: 3 as an RGB composite, else 1 (grey: the first channel)."""
    return 3 if num_channels == 3 else 1


def channel_note(num_channels: int) -> str:
    """A title suffix saying what a figure of ``num_channels``-channel images shows ('' for 1 and 3)."""
    if num_channels in (1, 3):
        return " (channels as RGB)" if num_channels == 3 else ""
    return f" (first of {num_channels} channels shown)"


def image_view(image: np.ndarray, axis: int = 0) -> np.ndarray:
    """The displayed channels of one image ``(C, H, W)`` or volume ``(C, D, H, W)`` (middle slice
    along spatial ``axis``): ``(3, H, W)`` for C = 3 (an RGB composite), else ``(1, H, W)`` (the
    first channel)."""
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image_view: expected (C, H, W) or (C, D, H, W), got {image.shape}")
    keep = image[: shown_channels(image.shape[0])]
    return np.stack([middle_slice(c, axis) for c in keep])


def show(ax, view: np.ndarray, **kwargs) -> None:
    """``imshow`` of a view ``(1, H, W)`` (grey) or ``(3, H, W)`` (RGB) with intensities in [-1, 1];
    a bare ``(H, W)`` array is shown as grey."""
    view = np.asarray(view)
    if view.ndim == 2:
        view = view[None]
    if view.shape[0] == 3:
        ax.imshow(np.clip((np.moveaxis(view, 0, -1) + 1.0) / 2.0, 0.0, 1.0), **kwargs)
    else:
        ax.imshow(view[0], cmap="gray", vmin=-1, vmax=1, **kwargs)


def encode_images(images: np.ndarray, scale: bool = True) -> dict:
    """Images as base64 uint8 (intensities [-1, 1] -> 0..255), small enough for report.json;
    ``scale=False`` stores integer label maps as they are. Any shape; images keep their channel
    axis (thumbnails are ``(N, C', H, W)`` from :func:`image_view`, C' = 1 or 3)."""
    data = np.round((np.asarray(images) + 1.0) * 127.5).clip(0, 255) if scale else images
    arr = np.ascontiguousarray(data, dtype=np.uint8)
    return {"shape": list(arr.shape), "uint8_base64": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_images(blob: dict, scale: bool = True) -> np.ndarray:
    """The inverse of :func:`encode_images` (to 1/127.5 of an intensity unit)."""
    arr = np.frombuffer(base64.b64decode(blob["uint8_base64"]), dtype=np.uint8).reshape(blob["shape"])
    return arr.astype(np.float32) / 127.5 - 1.0 if scale else arr.copy()


def png_bytes(fig) -> bytes:
    """A figure as PNG bytes, deterministic (no software or time stamp), and closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def save_grid(path: str | Path, images: np.ndarray, masks: Optional[np.ndarray] = None, *, title: str = "",
              columns: int = 8) -> None:
    """A grid of samples ``(N, C, *S)`` (middle axial slice for volumes), with mask contours
    overlaid if given; see :func:`grid_png`."""
    if len(images) == 0:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(grid_png(images, masks, title=title, columns=columns))


def grid_png(images: np.ndarray, masks: Optional[np.ndarray] = None, *, title: str = "", columns: int = 8,
             row_labels: Optional[Sequence[str]] = None, present: Optional[Sequence[bool]] = None) -> bytes:
    """PNG bytes of a grid of images ``(N, C, H, W)`` or volumes ``(N, C, D, H, W)`` (middle slice);
    masks ``(N, *S)``. C = 3 is shown as an RGB composite, C = 1 as grey, other C as the first
    channel (and the title says so). ``present[i]`` False leaves cell i empty (a row's padding:
    a black tile would read as a failed sample)."""
    n = len(images)
    note = channel_note(images.shape[1]) if n and np.ndim(images) >= 4 else ""
    title = title + note if title else note.strip(" ()")
    cols = min(columns, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.4 * rows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        if present is not None and not present[i]:
            continue
        ax = axes.flat[i]
        show(ax, image_view(images[i]))
        if masks is not None:
            m = middle_slice(masks[i])
            if m.max() > 0:
                ax.contour(m, levels=np.arange(0.5, m.max() + 0.5), linewidths=0.5, cmap="autumn")
    for r, label in enumerate(row_labels or []):
        if r < rows:
            axes[r, 0].text(-0.08, 0.5, label, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def orthogonal_png(slices: Sequence[np.ndarray], masks: Optional[Sequence[np.ndarray]] = None, *, title: str = "") -> bytes:
    """Three orthogonal middle slices (rows; each ``(N, C', a, b)`` views from :func:`image_view`,
    or ``(N, a, b)`` grey) of N volumes (columns)."""
    n = len(slices[0])
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 4.8), squeeze=False)
    for j in range(n):
        for axis in range(3):
            ax = axes[axis, j]
            ax.axis("off")
            view = np.asarray(slices[axis][j])
            show(ax, np.rot90(view, axes=(-2, -1)))
            if masks is not None:
                m = np.rot90(masks[axis][j])
                if m.max() > 0:
                    ax.contour(m, levels=np.arange(0.5, m.max() + 0.5), linewidths=0.5, cmap="autumn")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def learning_curve_png(summary: dict, sizes: dict, metric: str, conditions: Sequence[str]) -> bytes:
    """The metric against real training size (log scale), one line per condition, with
    Nadeau-Bengio corrected 95% intervals over splits as error bars, offset so none hides another."""
    fig, ax = plt.subplots(figsize=(7.6, 3.8), layout="constrained")
    fractions = sorted(summary, key=float)
    xs = {p: float(np.log2(max(sizes[p]["n_real"], 1.0))) for p in fractions}
    extent = []
    for i, c in enumerate(conditions):
        pts = [(xs[p], summary[p][c][metric]) for p in fractions if metric in summary[p].get(c, {})]
        if not pts:
            continue
        x = np.array([q[0] for q in pts]) + (i - (len(conditions) - 1) / 2) * 0.04
        y = np.array([q[1]["mean"] for q in pts])
        low = np.array([q[1]["nb_ci_low"] for q in pts], dtype=float)
        high = np.array([q[1]["nb_ci_high"] for q in pts], dtype=float)
        err = np.vstack([np.nan_to_num(y - low), np.nan_to_num(high - y)])
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.2, label=c)
        extent += [*(y - err[0]), *(y + err[1])]
    if metric != "mean_hd95" and extent:  # a score in [0, 1]: with few splits an interval can overshoot
        ax.set_ylim(max(-0.02, min(extent) - 0.02), min(1.02, max(extent) + 0.02))
    ax.set_xticks([xs[p] for p in fractions],
                  [f"{float(p):.0%}\n(n={sizes[p]['n_real']:.0f})" for p in fractions], fontsize=7)
    ax.set_xlim(min(xs.values()) - 0.5, max(xs.values()) + 0.5)
    ax.set_xlabel("real training data per split (log scale)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric_label(metric)} against real-data size (mean over splits, corrected 95% CI)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return png_bytes(fig)


def paired_differences_png(comparisons: dict, metric: str) -> bytes:
    """Per real-data size (panel): each condition's per-split differences from baseline (dots),
    their mean (bar) and the Nadeau-Bengio corrected 95% interval of the mean (line; with few
    splits a bootstrap interval is no wider than the dots' range and would understate it)."""
    fractions = sorted(comparisons, key=float, reverse=True)
    width = max(6.0, 0.6 * sum(len(comparisons[p]) for p in fractions) + 1.5 * len(fractions))
    fig, axes = plt.subplots(1, len(fractions), figsize=(width, 3.8), squeeze=False, layout="constrained", sharey=True)
    for ax, p in zip(axes[0], fractions):
        conds = [c for c in comparisons[p] if "differences" in comparisons[p][c].get(metric, {})]
        for i, c in enumerate(conds):
            r = comparisons[p][c][metric]
            d = np.asarray(r["differences"], dtype=float)
            ax.scatter(np.full(len(d), i) + np.linspace(-0.1, 0.1, len(d)), d, s=14, alpha=0.8)
            ax.hlines(r["mean_diff"], i - 0.25, i + 0.25, color="k")
            ax.vlines(i + 0.3, r["nb_ci_low"], r["nb_ci_high"], color="k", lw=1)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(conds)), conds, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"real data {float(p):.0%}", fontsize=9)
    axes[0, 0].set_ylabel(f"{metric_label(metric)} minus baseline")
    fig.suptitle("differences from baseline per split (seed-averaged): dots; mean: bar; corrected 95% CI: line",
                 fontsize=8)
    return png_bytes(fig)


def roc_png(roc: dict) -> bytes:
    """One panel per real-data size, one ROC curve per condition (pooled over splits and seeds)."""
    fractions = sorted(roc["curves"], key=float, reverse=True)
    fig, axes = plt.subplots(1, len(fractions), figsize=(max(4.0, 3.6 * len(fractions)), 4.0), squeeze=False, layout="constrained")
    for ax, p in zip(axes[0], fractions):
        for c, curve in roc["curves"][p].items():
            ax.plot(roc["fpr"], curve["tpr"], lw=1.2, label=f"{c} ({num(curve['auc_pooled'], '.3f')})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        kind = next(iter(roc["curves"][p].values()))["kind"]
        ax.set_title(f"real data {float(p):.0%} ({kind})", fontsize=8)
        ax.set_xlabel("false positive rate")
        ax.set_aspect("equal")
        ax.legend(fontsize=6, loc="lower right")
    axes[0, 0].set_ylabel("true positive rate")
    return png_bytes(fig)


def confusion_png(confusion: dict, class_names: Sequence[str]) -> bytes:
    """Row-normalised confusion matrices: rows of panels are real-data sizes, columns conditions."""
    fractions = sorted(confusion, key=float, reverse=True)
    conds = list(dict.fromkeys(c for p in fractions for c in confusion[p]))
    k = len(class_names)
    size = 1.2 + 0.3 * min(k, 8)  # many conditions make a wide figure; the page scales it down
    fig, axes = plt.subplots(len(fractions), len(conds), figsize=(max(5.5, size * len(conds)), size * len(fractions) + 0.9),
                             squeeze=False, layout="constrained")
    short = [n[:10] for n in class_names]
    for i, p in enumerate(fractions):
        for j, c in enumerate(conds):
            ax = axes[i, j]
            if c not in confusion[p]:
                ax.axis("off")
                continue
            m = np.asarray(confusion[p][c], dtype=float)
            norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
            ax.imshow(norm, vmin=0, vmax=1, cmap="Blues", aspect="auto")
            for a in range(k):
                for b in range(k):
                    ax.text(b, a, f"{norm[a, b]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[a, b] > 0.6 else "black")
            ax.set_xticks(range(k), short if i == len(fractions) - 1 else [], rotation=45, ha="right", fontsize=6)
            ax.set_yticks(range(k), short if j == 0 else [], fontsize=6)
            ax.set_title(f"{c}, {float(p):.0%}", fontsize=7)
    fig.suptitle("confusion matrices, row-normalised (rows: true class; columns: predicted)", fontsize=8)
    return png_bytes(fig)


def loss_curves_png(histories: dict[str, list[list[float]]]) -> bytes:
    """Training loss (EMA) of every generator: ``{name: [[step, loss], ...]}``."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, rows in histories.items():
        if rows:
            ax.plot([r[0] for r in rows], [r[1] for r in rows], label=name, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (EMA)")
    ax.set_yscale("log")
    ax.set_title("generator training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return png_bytes(fig)
