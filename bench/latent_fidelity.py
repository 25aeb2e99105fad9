"""Benchmark (issue 17): latent against pixel diffusion at 128x128 on real MRI, at equal training compute.

    .venv/bin/python bench/latent_fidelity.py [--data DIR] [--ae-steps 800] [--steps 1200] [--samples 128]
                                              [--grid out.png] [--json out.json] [--quick]

Fold 0 of 3 of ``../shared/data/brain-tumor-mri-4class/Training`` (the leak-free split), prepared
at 128x128 as ``raysynth prepare`` does. Side by side, in one process:

- **latent**: the ``latent`` preset's autoencoder (MONAI AutoencoderKL, factor 4: 32x32x4 latents)
  trained on the fold's real training part, then a rectified-flow denoiser on its scaled latents;
- **pixel**: the same process and denoiser widths on the 128x128 images, trained for the same
  wall-clock time as the latent path's autoencoder and denoiser together (equal compute).

Both draw the same seeds and labels (Euler, 10 steps) and are scored as ``bench/objectives.py``
scores: FD against the real test part divided by FD(real training, real test) on the quality
stage's encoder (target <= 1.5), label fidelity (target >= 0.9), intensity differences (target
|d| <= 0.05), and ms per sample (target: latent at least 4x cheaper). The autoencoder's PSNR, SSIM
and MS-SSIM on the real test part say what it loses before diffusion starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objectives import Yardstick  # noqa: E402  (fold 0's scoring kit, as the objectives bench scores)
from real_study import SHARED, cpu  # noqa: E402  (bench helpers: the shared data folder, the CPU line)
from samplers import train_generator  # noqa: E402  (the same seeded training loop)

from raysynth.artifacts import Layout, read_prepared  # noqa: E402
from raysynth.config import load_config  # noqa: E402
from raysynth.diffusion.autoencoder import AutoencoderFit, decode, encode, scale_factor  # noqa: E402
from raysynth.quality.reconstruction import reconstruction_metrics  # noqa: E402
from raysynth.runtime import derive_seed  # noqa: E402
from raysynth.stages.prepare import prepare  # noqa: E402


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def train_autoencoder(cfg, x0: torch.Tensor, steps: int, seed: int) -> tuple[torch.nn.Module, float]:
    """The ``autoencoder`` stage's fit (seeded batches), in process; returns the network and seconds."""
    torch.manual_seed(derive_seed(seed, 13))
    fit = AutoencoderFit(cfg.autoencoder.replace(train_steps=steps), dims=x0.ndim - 2, in_channels=x0.shape[1],
                         bf16=cfg.diffusion.cpu_bf16)
    t0 = time.perf_counter()
    for step in range(steps):
        g = torch.Generator().manual_seed(derive_seed(seed, 14, step))
        idx = torch.randint(0, x0.shape[0], (cfg.autoencoder.batch_size,), generator=g)
        loss = fit.step(x0[idx], None, generator=g)
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"  autoencoder: step {step + 1}/{steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)")
    return fit.model.eval(), time.perf_counter() - t0


def draw(model, process, labels: np.ndarray, seeds: list[int], shape: tuple, decoder=None, scale: float = 1.0,
         batch: int = 32) -> tuple[np.ndarray, float]:
    """Samples (n, C, H, W) in [-1, 1] and the ms per sample, Euler 10 steps, decoded when latent."""
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for i in range(0, len(seeds), batch):
            gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
            x = process.sample(model, torch.as_tensor(labels[i:i + batch]), shape, "euler", 10, gens)
            if decoder is not None:
                x = decode(decoder, x.float() / scale)
            out.append(x.float().clamp(-1, 1).numpy())
    return np.concatenate(out), 1000 * (time.perf_counter() - t0) / len(seeds)


def save_grid(path: Path, rows: dict[str, tuple[np.ndarray, np.ndarray]], class_names: list[str]) -> None:
    """One row per source of ``(images, labels)``, each tile titled with its own label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 1.6, len(rows) * 1.75))
    for r, (name, (images, labels)) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(images[c, 0], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            ax.set_title(class_names[int(labels[c])].replace("_tumor", ""), fontsize=7)
    fig.suptitle("brain-tumor-mri-4class fold 0 at 128x128: real test images and samples (Euler 10)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "brain-tumor-mri-4class" / "Training"))
    p.add_argument("--ae-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=1200, help="latent denoiser steps")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=Path, help="write a PNG of real test images and both paths' samples")
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="a 2-minute smoke run of every path (64x64, few steps)")
    args = p.parse_args(argv)
    if args.quick:
        args.ae_steps, args.steps, args.samples = 10, 10, 16
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    bf16 = str(torch.backends.mkldnn.is_available() and "avx512_bf16" in cpu()).lower()
    size = 64 if args.quick else 128
    cfg = load_config("latent", None, [f"data.source={args.data}", f"data.image_size={size}", "cv.folds=3",
                                       f"diffusion.cpu_bf16={bf16}", "quality.encoder_epochs=5"])
    scratch = tempfile.TemporaryDirectory(prefix="bench-latent-fidelity-")
    layout = Layout.at(scratch.name)
    prepare(cfg, layout)
    records, fingerprint, splits = read_prepared(layout, cfg)
    y = Yardstick(cfg, records, fingerprint, splits[0], args.samples)
    real_train, real_test, x0, labels, num_classes = y.real_train, y.real_test, y.x0, y.labels, y.num_classes
    class_names = list(fingerprint["class_names"])
    log(f"fold 0: {len(real_train)} training, {len(real_test)} test images at {size}x{size}")
    reference_fd, test_acc, real, n, sample_labels, seeds = y.reference_fd, y.test_acc, y.real, y.n, y.labels_drawn, y.seeds

    # 1. Latent: the autoencoder, its scaled latents, the denoiser on them.
    log(f"latent: autoencoder {cfg.autoencoder.channels}, {args.ae_steps} steps of batch {cfg.autoencoder.batch_size}")
    ae, ae_s = train_autoencoder(cfg, x0, args.ae_steps, cfg.seed)
    z = encode(ae, x0)
    scale = scale_factor(z)
    recon = reconstruction_metrics(ae, real_test.images, None, 0)
    log(f"  test reconstruction: PSNR {recon['psnr']:.2f} dB, SSIM {recon['ssim']:.3f}, MS-SSIM {recon['ms_ssim']}")
    log(f"latent: denoiser {cfg.diffusion.channels} on {tuple(z.shape[1:])} latents, {args.steps} steps")
    lat_model, lat_process, lat_s = train_generator(cfg, {}, z * scale, labels, args.steps, num_classes)
    lat_x, lat_ms = draw(lat_model, lat_process, sample_labels, seeds, tuple(z.shape[1:]), decoder=ae, scale=scale)

    # 2. Pixel: the same process and widths on the images, for the latent path's whole training time.
    budget = ae_s + lat_s
    log(f"pixel: denoiser {cfg.diffusion.channels} on {tuple(x0.shape[1:])}, {budget:.0f}s (the latent path's)")
    pix_model, pix_process, pix_s = train_generator(cfg, {}, x0, labels, 10**9, num_classes, seconds=budget)
    pix_x, pix_ms = draw(pix_model, pix_process, sample_labels, seeds, tuple(x0.shape[1:]))

    rows = []
    for name, x, ms, train_s in (("latent", lat_x, lat_ms, budget), ("pixel", pix_x, pix_ms, pix_s)):
        rows.append({"path": name, **y.score(x), "train_s": train_s, "ms_per_sample": ms})
    if args.grid:
        shown = np.concatenate([np.flatnonzero(real_test.labels == c)[:2] for c in range(num_classes)])
        save_grid(args.grid, {"real test": (real_test.images[shown], real_test.labels[shown]),
                              "latent": (lat_x, sample_labels), "pixel": (pix_x, sample_labels)}, class_names)
    print(f"\nCPU: {cpu()}, torch threads {args.threads}, bf16 autocast in training: {bf16}. Data: {args.data}, fold 0 "
          f"of 3: {len(real_train)} training, {len(real_test)} test images at {size}x{size}. Latent: autoencoder "
          f"{cfg.autoencoder.channels} (factor {cfg.autoencoder.downsampling_factor}, {cfg.autoencoder.latent_channels} "
          f"latent channels) {args.ae_steps} steps in {ae_s:.0f}s, scale factor {scale:.3f}; denoiser "
          f"{cfg.diffusion.channels} {args.steps} steps in {lat_s:.0f}s. Pixel: the same denoiser widths for "
          f"{pix_s:.0f}s. Flow, Euler 10 steps, {n} samples per path. Real test: mean {real['mean']:.3f}, "
          f"p5 {real['p5']:.3f}, p95 {real['p95']:.3f}; encoder accuracy {test_acc:.3f}; FD(real train, real test) "
          f"{reference_fd:.4g}. Autoencoder on the real test part: PSNR {recon['psnr']:.2f} dB, SSIM "
          f"{recon['ssim']:.3f}, MS-SSIM {recon['ms_ssim'] if recon['ms_ssim'] is None else round(recon['ms_ssim'], 3)}. "
          f"Total {(time.perf_counter() - t_start) / 60:.1f} min.\n")
    print("| path | training s | FD ratio (<= 1.5) | label fidelity (>= 0.9) | mean diff | p5 diff | p95 diff | "
          "saturated px | ms/sample |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['train_s']:.0f} | {r['fd_ratio']:.2f} | {r['label_fidelity']:.2f} | {r['d_mean']:+.3f} | "
              f"{r['d_p5']:+.3f} | {r['d_p95']:+.3f} | {r['saturated']:.3f} | {r['ms_per_sample']:.1f} |")
    print(f"\nSampling: latent {rows[1]['ms_per_sample'] / rows[0]['ms_per_sample']:.1f}x cheaper per sample than pixel "
          "(target >= 4x).")
    if args.json:
        args.json.write_text(json.dumps({"reference_fd": reference_fd, "test_accuracy": test_acc, "real": real,
                                         "reconstruction": recon, "scale_factor": scale, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
