"""Figures shared by the stages: sample grids and per-fold metric plots (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def middle_slice(image: np.ndarray, axis: int = 0) -> np.ndarray:
    """A 2D view of a 2D image ``(H, W)`` or the middle slice of a volume ``(D, H, W)``."""
    if image.ndim == 2:
        return image
    if image.ndim != 3:
        raise ValueError(f"middle_slice: expected (H, W) or (D, H, W), got {image.shape}")
    return np.take(image, image.shape[axis] // 2, axis=axis)


def save_grid(path: str | Path, images: np.ndarray, masks: Optional[np.ndarray] = None, *, title: str = "",
              columns: int = 8) -> None:
    """A grid of samples (middle axial slice for volumes), with mask contours overlaid if given."""
    n = len(images)
    if n == 0:
        return
    cols = min(columns, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.4 * rows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(middle_slice(images[i]), cmap="gray", vmin=-1, vmax=1)
        if masks is not None:
            m = middle_slice(masks[i])
            if m.max() > 0:
                ax.contour(m, levels=np.arange(0.5, m.max() + 0.5), linewidths=0.5, cmap="autumn")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_orthogonal(path: str | Path, volumes: np.ndarray, masks: Optional[np.ndarray] = None, *, title: str = "") -> None:
    """Three orthogonal middle slices (rows) of several volumes (columns), masks as contours."""
    n = len(volumes)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 4.8), squeeze=False)
    for j in range(n):
        for axis in range(3):
            ax = axes[axis, j]
            ax.axis("off")
            ax.imshow(np.rot90(middle_slice(volumes[j], axis)), cmap="gray", vmin=-1, vmax=1)
            if masks is not None:
                m = np.rot90(middle_slice(masks[j], axis))
                if m.max() > 0:
                    ax.contour(m, levels=np.arange(0.5, m.max() + 0.5), linewidths=0.5, cmap="autumn")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_fold_metric(path: str | Path, table: dict[str, dict[int, float]], metric: str) -> None:
    """Per-fold metric per arm: one line per arm over folds (values averaged over seeds)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for arm, by_fold in table.items():
        folds = sorted(by_fold)
        ax.plot(folds, [by_fold[f] for f in folds], marker="o", label=arm)
    ax.set_xlabel("fold")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"{metric.replace('_', ' ')} per fold")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_paired_differences(path: str | Path, diffs: dict[str, Sequence[float]], metric: str) -> None:
    """Paired differences (arm minus baseline) per fold, one strip per arm, with the mean."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for i, (arm, values) in enumerate(diffs.items()):
        values = np.asarray(values, dtype=float)
        ax.scatter(np.full(len(values), i) + np.linspace(-0.08, 0.08, len(values)), values, s=18, alpha=0.8)
        ax.hlines(np.nanmean(values), i - 0.25, i + 0.25, color="k")
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(diffs)), list(diffs))
    ax.set_ylabel(f"{metric.replace('_', ' ')} minus baseline")
    ax.set_title("paired differences per fold (seed-averaged)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_loss_curves(path: str | Path, histories: dict[int, list[dict]]) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for fold, rows in sorted(histories.items()):
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss_ema"] for r in rows], label=f"fold {fold}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (EMA)")
    ax.set_yscale("log")
    ax.set_title("generator training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
