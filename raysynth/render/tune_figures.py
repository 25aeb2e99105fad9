"""The gamma / learning-rate search's figures: FD against gamma and against the learning rate."""

from __future__ import annotations

import math
from typing import Any, Optional


def plot_trials(rows: list[dict[str, Any]], reference_fd: float, out, ranges: Optional[dict] = None) -> None:
    """``fd_vs_gamma.png`` (log x, colour = learning rate; DDPM trials, which have no gamma, as
    dashed lines) and ``fd_vs_lr.png`` (log x, one marker per process); x marks trials that did not
    complete. ``ranges`` maps ``gamma``/``learning_rate`` to the searched interval, the x limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    done = [r for r in rows if math.isfinite(r["best_fd"])]
    lrs = [r["learning_rate"] for r in rows] or [1e-4]
    norm, cmap = LogNorm(min(lrs), max(lrs) * (1 + 1e-9)), plt.get_cmap("viridis")
    for name, x_key in (("fd_vs_gamma.png", "gamma"), ("fd_vs_lr.png", "learning_rate")):
        fig, ax = plt.subplots(figsize=(5.6, 4.0))
        for proc, marker in (("gamma", "o"), ("ddpm", "s")):
            for stopped in (False, True):
                pts = [r for r in done if r["process"] == proc and (r["status"] != "completed") == stopped]
                if not pts or (x_key == "gamma" and proc == "ddpm"):
                    continue
                ax.scatter([r[x_key] for r in pts], [r["best_fd"] for r in pts], c=[r["learning_rate"] for r in pts],
                           cmap=cmap, norm=norm, marker="x" if stopped else marker, s=40,
                           label=f"{proc}{' (stopped early)' if stopped else ''}")
        if x_key == "gamma":
            for r in (r for r in done if r["process"] == "ddpm"):
                ax.axhline(r["best_fd"], ls="--", lw=1, color=cmap(norm(r["learning_rate"])))
            if any(r["process"] == "ddpm" for r in done):
                ax.plot([], [], ls="--", color="grey", label="ddpm (no gamma)")
        ax.axhline(reference_fd, ls=":", color="black", lw=1, label="real vs real")
        ax.set_xscale("log")
        if ranges and x_key in ranges:
            lo, hi = ranges[x_key]
            ax.set_xlim(lo / 1.2, hi * 1.2)  # the searched interval, so a point's place in it shows
        ax.set_xlabel("gamma (sigma_max = sqrt(2 gamma))" if x_key == "gamma" else "learning rate")
        ax.set_ylabel("best FD vs validation (lower is better)")
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="learning rate")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
