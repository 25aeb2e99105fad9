"""Figures of the quality stage: the nearest-NCC distribution and the closest synthetic/real pairs.

Matplotlib runs headless (Agg) because the stage runs on cluster nodes without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raysynth.io import atomic_path
from raysynth.render.figures import channel_note, image_view, middle_slice, show


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:  # like every artifact
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_ncc_histograms(per_fold: Sequence[dict], threshold: float, path: str | Path) -> None:
    """One panel per fold: nearest-real NCC of synthetic samples, with the threshold line.

    Args:
        per_fold: dicts with ``fold`` (int), ``synthetic`` ``(M,)`` nearest NCC of each synthetic
            sample, and optionally ``reference`` ``(K,)`` nearest NCC of each held-out real image to
            the training images (how close two distinct real images naturally are).
        threshold: the gate's NCC threshold, drawn as a vertical line.
        path: the PNG to write.
    """
    if not per_fold:
        raise ValueError("per_fold: nothing to plot")
    n = len(per_fold)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=False)
    default_threshold = threshold
    for ax, item in zip(axes[0], per_fold):
        threshold = float(item.get("threshold", default_threshold))  # a fold may have its own (relative) gate
        synth = np.asarray(item["synthetic"], dtype=float)
        ref = item.get("reference")
        lo = min(float(synth.min()) if synth.size else 0.0,
                 float(np.min(ref)) if ref is not None and len(ref) else 1.0, threshold) - 0.02
        bins = np.linspace(max(-1.0, lo), 1.0, 41)
        ax.hist(synth, bins=bins, density=True, alpha=0.65, color="tab:blue", label=f"synthetic (n={synth.size})")
        if ref is not None and len(ref):
            ax.hist(np.asarray(ref, dtype=float), bins=bins, density=True, histtype="step", linewidth=1.6,
                    color="tab:green", label=f"held-out real (n={len(ref)})")
        over = int(np.sum(synth > threshold))
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g} ({over} above)")
        ax.set_title(f"fold {item['fold']}: nearest real training image")
        ax.set_xlabel("normalised cross-correlation (NCC)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Memorisation: NCC of each image with its nearest real training image", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_nearest_pairs(synthetic: np.ndarray, real: np.ndarray, ncc: np.ndarray, path: str | Path,
                       fold: int, threshold: Optional[float] = None,
                       captions: Optional[Sequence[str]] = None) -> None:
    """The closest synthetic/real pairs side by side: synthetic on top, its nearest real below.

    Args:
        synthetic, real: ``(P, C, *spatial)`` matched pairs, closest first (3D shows the middle
            slice; C = 3 as RGB, other C > 1 the first channel).
        ncc: ``(P,)`` the pair's NCC, shown in each title (red when above ``threshold``).
        path: the PNG to write; fold: for the title; captions: optional per-pair text (e.g. labels).
    """
    synthetic, real, ncc = np.asarray(synthetic), np.asarray(real), np.asarray(ncc, dtype=float)
    if not (len(synthetic) == len(real) == len(ncc)) or len(ncc) == 0:
        raise ValueError(f"need matching non-empty pairs, got {len(synthetic)} synthetic, {len(real)} real, "
                         f"{len(ncc)} NCC values")
    p = len(ncc)
    fig, axes = plt.subplots(2, p, figsize=(1.9 * p + 0.6, 4.3), squeeze=False)
    for j in range(p):
        for row, (img, name) in enumerate(((synthetic[j], "synthetic"), (real[j], "nearest real"))):
            ax = axes[row, j]
            show(ax, image_view(img), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
        flagged = threshold is not None and ncc[j] > threshold
        title = f"NCC {ncc[j]:.3f}" + (f"\n{captions[j]}" if captions else "")
        axes[0, j].set_title(title, fontsize=8, color="tab:red" if flagged else "black")
    view = (" (middle slice)" if synthetic.ndim == 5 else "") + channel_note(synthetic.shape[1])
    fig.suptitle(f"Fold {fold}: closest synthetic / real training pairs{view}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


__all__ = ["middle_slice", "image_view", "plot_ncc_histograms", "plot_nearest_pairs"]
