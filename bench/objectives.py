"""Benchmark (issue 16): do the modern objectives fix the samples? Side by side, one run, one fold.

    .venv/bin/python bench/objectives.py [--data DIR] [--steps 400] [--samples 128] [--json F]

Trains one small generator per objective on fold 0's real training part of
``../shared/data/brain-tumor-mri-4class/Training`` at 32x32 (the same seeds, batches, UNet and
steps for all), then samples the same seeds per sampler and scores each against the fold's real
test part:

- FD ratio: FD(synthetic, real test) / FD(real training, real test), on the quality stage's encoder
  (fitted on the real training part); target <= 1.5.
- label fidelity: the encoder's classifier accuracy on synthetic samples (with their conditioning
  labels) / its accuracy on the real test part; target >= 0.9.
- intensities: synthetic minus real test mean, 5th and 95th percentile over all pixels,
  background included; target |difference| <= 0.05.
- x0 saturation: the fraction of synthetic pixels at |x| >= 0.99 (the DPM-Solver++ drift).

Rows: DDPM epsilon (the default until now), DDPM v-prediction with a zero-terminal-SNR schedule,
the same with Min-SNR-5 weighting, and rectified flow (trained with class dropout 0.1, so it is
also sampled with classifier-free guidance at w = 2). Prints a Markdown table.
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
from real_study import SHARED, cpu  # noqa: E402  (bench helpers: the shared data folder, the CPU line)
from samplers import train_generator  # noqa: E402  (the same seeded training loop)

from raysynth.artifacts import Layout, read_prepared  # noqa: E402
from raysynth.config import load_config  # noqa: E402
from raysynth.diffusion.trainer import training_tensors  # noqa: E402
from raysynth.quality.features import train_encoder  # noqa: E402
from raysynth.quality.metrics import frechet_distance  # noqa: E402
from raysynth.runtime import derive_seed  # noqa: E402
from raysynth.stages.prepare import prepare  # noqa: E402

VARIANTS = {  # name: (diffusion overrides, [(sampler, steps, guidance)])
    "ddpm eps": ({"process": "ddpm"}, [("ddim", 50, 1.0), ("dpmsolver++", 10, 1.0)]),
    "ddpm v + zero-SNR": ({"process": "ddpm", "prediction_type": "v_prediction", "zero_terminal_snr": True},
                          [("ddim", 50, 1.0), ("dpmsolver++", 10, 1.0)]),
    "ddpm v + zero-SNR + min-SNR 5": ({"process": "ddpm", "prediction_type": "v_prediction",
                                       "zero_terminal_snr": True, "snr_gamma": 5.0},
                                      [("ddim", 50, 1.0), ("dpmsolver++", 10, 1.0)]),
    "flow (class dropout 0.1)": ({"process": "flow", "class_dropout": 0.1},
                                 [("euler", 50, 1.0), ("euler", 10, 1.0), ("heun", 5, 1.0), ("euler", 10, 2.0)]),
}
from raysynth.diffusion.tune_trial import COVARIANCE  # noqa: E402  (the quality stage's covariance)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def stats(images: np.ndarray) -> dict:
    flat = images.reshape(-1)
    return {"mean": float(flat.mean()), "p5": float(np.percentile(flat, 5)), "p95": float(np.percentile(flat, 95)),
            "saturated": float(np.mean(np.abs(flat) >= 0.99))}


class Yardstick:
    """Fold ``split``'s scoring kit, shared by the fidelity benches: the real parts, the quality
    stage's encoder fitted on the training part, FD(real training, real test) as the unit, the
    encoder's test accuracy, the real test intensities, and ``n`` seeded draws (classes in turn)."""

    def __init__(self, cfg, records, fingerprint, split: dict, n: int) -> None:
        self.real_train, self.real_test = records.subset_ids(split["train"]), records.subset_ids(split["test"])
        self.x0, self.labels = training_tensors(self.real_train, 0)
        self.num_classes = int(fingerprint["num_classes"])
        self.encoder = train_encoder(self.real_train.images, self.real_train.labels, 2, cfg.quality.feature_dim,
                                     cfg.quality.encoder_epochs, cfg.seed)
        self.test_f = self.encoder.features(self.real_test.images)
        self.reference_fd = frechet_distance(self.test_f, self.encoder.features(self.real_train.images),
                                             covariance=COVARIANCE)
        self.test_acc = self.encoder.accuracy(self.real_test.images, self.real_test.labels)
        self.real = stats(self.real_test.images)
        self.n = n
        self.labels_drawn = np.arange(n) % self.num_classes
        self.seeds = [derive_seed(cfg.seed, 3, j) % 2**63 for j in range(n)]

    def score(self, x: np.ndarray) -> dict:
        """FD ratio, label fidelity, intensity differences and saturation of samples ``x`` drawn
        with :attr:`labels_drawn`."""
        s = stats(x)
        return {"fd_ratio": frechet_distance(self.test_f, self.encoder.features(x), covariance=COVARIANCE) / self.reference_fd,
                "label_fidelity": self.encoder.accuracy(x, self.labels_drawn) / self.test_acc,
                **{f"d_{k}": s[k] - self.real[k] for k in ("mean", "p5", "p95")}, "saturated": s["saturated"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "brain-tumor-mri-4class" / "Training"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    cfg = load_config("default", None, [f"data.source={args.data}", "data.image_size=32", "cv.folds=3",
                                        "diffusion.channels=[32,64]", "diffusion.batch_size=32",
                                        f"diffusion.cpu_bf16={str(torch.backends.mkldnn.is_available()).lower()}",
                                        "quality.encoder_epochs=5"])
    scratch = tempfile.TemporaryDirectory(prefix="bench-objectives-")
    layout = Layout.at(scratch.name)
    prepare(cfg, layout)
    records, fingerprint, splits = read_prepared(layout, cfg)
    y = Yardstick(cfg, records, fingerprint, splits[0], args.samples)
    real_train, real_test, x0, labels, num_classes = y.real_train, y.real_test, y.x0, y.labels, y.num_classes
    reference_fd, test_acc, real, n, sample_labels, seeds = y.reference_fd, y.test_acc, y.real, y.n, y.labels_drawn, y.seeds
    rows = []
    for name, (overrides, grid) in VARIANTS.items():
        log(f"training {name}: {args.steps} steps on {len(real_train)} images")
        model, process, train_s = train_generator(cfg, overrides, x0, labels, args.steps, num_classes)
        for sampler, steps, w in grid:
            t0 = time.perf_counter()
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            with torch.inference_mode():
                x = process.sample(model, torch.as_tensor(sample_labels), tuple(x0.shape[1:]), sampler, steps, gens,
                                   guidance_scale=w).numpy()
            row = {"objective": name, "sampler": sampler, "steps": steps, "guidance": w,
                   "nfe": len(process.make_scheduler(sampler, steps).timesteps) * (1 if w == 1.0 else 2),
                   **y.score(x), "train_s": train_s, "sample_ms": 1000 * (time.perf_counter() - t0) / n}
            rows.append(row)
            log(f"  {sampler} {steps} w={w}: FD ratio {row['fd_ratio']:.2f}, label fidelity {row['label_fidelity']:.2f}, "
                f"d mean {row['d_mean']:+.3f}, saturated {row['saturated']:.3f}")
    print(f"\nCPU: {cpu()}, torch threads {args.threads}. Data: {args.data}, fold 0 of 3: {len(real_train)} training, "
          f"{len(real_test)} test images at 32x32. {args.steps} training steps per objective, UNet [32, 64], "
          f"{n} samples per row. Real test: mean {real['mean']:.3f}, p5 {real['p5']:.3f}, p95 {real['p95']:.3f}; "
          f"encoder accuracy on it {test_acc:.3f}; FD(real train, real test) {reference_fd:.4g}. "
          f"Total {(time.perf_counter() - t_start) / 60:.1f} min.\n")
    print("| objective | sampler | steps | guidance | NFE | FD ratio (<= 1.5) | label fidelity (>= 0.9) | "
          "mean diff | p5 diff | p95 diff | saturated px | train s | ms/sample |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['objective']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['nfe']} | {r['fd_ratio']:.2f} | "
              f"{r['label_fidelity']:.2f} | {r['d_mean']:+.3f} | {r['d_p5']:+.3f} | {r['d_p95']:+.3f} | "
              f"{r['saturated']:.3f} | {r['train_s']:.0f} | {r['sample_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"reference_fd": reference_fd, "test_accuracy": test_acc, "real": real,
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
