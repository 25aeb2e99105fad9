"""Benchmark: sample quality against network evaluations (NFE) and wall time, for every sampler of both processes.

Method. A small class-conditional generator per process (DDPM and the paper's gamma process) is
trained briefly on the embedded cohort at 32x32 with the training step of ``raysynth train``
(:class:`~raysynth.diffusion.trainer.GeneratorFit`), or one trained generator is loaded from a run
(``--run DIR --fold K``). Every sampler then draws the same seeds (one per sample, class
proportions of the held-out set) in one batch; the Fréchet distance (Ledoit-Wolf covariance, as
in the quality stage) and KID compare encoder features of the samples with the fold's held-out
real images. The encoder is the quality stage's, fitted on the fold's real training part. NFE is
counted by wrapping the network, not inferred from the step count. A real-vs-real FD (as many
training images as samples, against the held-out images) gives the scale of "as good as real".

All rows run side by side in one process, so the speed-up ratios (against ancestral DDPM at 1000
steps) share the machine's conditions even on a busy shared box; absolute times do not.

Usage::

    .venv/bin/python bench/samplers.py                 # ~6-10 min on 2 cores
    .venv/bin/python bench/samplers.py --quick         # ~2 min
    .venv/bin/python bench/samplers.py --run runs/default --fold 0 --json bench_samplers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from raysynth.config import load_config
from raysynth.artifacts import read_prepared as load_prepared
from raysynth.stages.prepare import prepare
from raysynth.diffusion.trainer import GeneratorFit, training_tensors
from raysynth.design import largest_remainder as eval_label_counts
from raysynth.diffusion.tune_trial import COVARIANCE, sample_quality
from raysynth.artifacts import Layout, read_json
from raysynth.quality.features import train_encoder
from raysynth.quality.metrics import frechet_distance
from raysynth.runtime import derive_seed

GRID = {
    "ddpm": [("ddpm", 1000), ("ddim", 10), ("ddim", 20), ("ddim", 50),
             ("dpmsolver++", 10), ("dpmsolver++", 20), ("dpmsolver++", 50)],
    "gamma": [("euler", 10), ("euler", 20), ("euler", 40), ("heun", 10), ("heun", 20), ("heun", 40)],
}
BASELINE = ("ddpm", "ddpm", 1000)  # Ho et al.'s ancestral sampler: what every speed-up is measured against
SETTINGS = {  # (train steps, samples): the full run, and --quick
    "full": (800, 96),
    "quick": (150, 32),
}


class CountingModel(torch.nn.Module):
    """Wraps a denoiser and counts its forward calls (network function evaluations)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x, t, class_labels)


def train_generator(cfg, overrides: dict, x0: torch.Tensor, labels: torch.Tensor, steps: int, num_classes: int,
                    seconds: float | None = None):
    """A briefly trained generator (the ``raysynth train`` step, seeded batches) with ``cfg.diffusion``
    updated by ``overrides``; returns the EMA model, the process and the training seconds. ``x0``'s
    side sets the denoiser's (latents are smaller than the images). ``seconds``: stop after that
    much training time even before ``steps`` (an equal-compute comparison)."""

    diffusion = cfg.diffusion.replace(**overrides)
    process = diffusion.process
    torch.manual_seed(derive_seed(cfg.seed, 1))
    fit = GeneratorFit(diffusion, dims=cfg.data.dims, in_channels=x0.shape[1], image_size=int(x0.shape[-1]),
                       num_classes=num_classes)
    fit.process.check_data_scale(float(x0.std()))
    t0 = time.perf_counter()
    for step in range(steps):
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, 2, step))
        idx = torch.randint(0, x0.shape[0], (diffusion.batch_size,), generator=g)
        loss = fit.step(x0[idx], labels[idx], generator=g)
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"  {process}: step {step + 1}/{steps} loss {loss:.4f} ({time.perf_counter() - t0:.0f}s)")
        if seconds is not None and time.perf_counter() - t0 >= seconds:
            log(f"  {process}: stopped at step {step + 1} after the {seconds:.0f}s budget")
            break
    seconds = time.perf_counter() - t0
    with fit.ema_weights() as model:  # sample from the EMA weights, as the sample stage does
        ema = copy.deepcopy(model)
    return ema.eval(), fit.process, seconds


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer training steps and samples (~2 min)")
    p.add_argument("--run", type=Path, help="a raysynth output root with a trained generator (ddpm/fold_K)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--train-steps", type=int, help="override the training steps of the fresh generators")
    p.add_argument("--samples", type=int, help="override the number of samples per sampler")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared machine)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    train_steps, n = SETTINGS["quick" if args.quick else "full"]
    train_steps, n = args.train_steps or train_steps, args.samples or n
    t_start = time.perf_counter()

    # 1. Data: the fold's real training part (generator, encoder) and held-out part (the FD target).
    if args.run is not None:
        from raysynth.diffusion.checkpoint import load_generator

        layout = Layout.at(args.run)
        model, process, meta = load_generator(layout, args.fold)
        cfg = load_config("default", overrides=[f"data.image_size={meta['image_size']}", f"data.dims={meta['dims']}"])
        records, fingerprint, splits = load_prepared(layout, cfg)
        train_ids = read_json(layout.ddpm(args.fold) / "train_ids.json")["train_ids"]
        generators = {meta["process"]: (model, process)}
        n_mask = int(meta["num_mask_classes"])
    else:
        cfg = load_config("default", overrides=["data.image_size=32", "diffusion.channels=[16,32,32]",
                                                 "diffusion.batch_size=32", "diffusion.learning_rate=5e-4"])
        scratch = tempfile.TemporaryDirectory(prefix="bench-samplers-")  # removed when main returns
        layout = Layout.at(scratch.name)
        log(f"preparing the embedded cohort at 32x32 in {layout.root}")
        prepare(cfg, layout)
        records, fingerprint, splits = load_prepared(layout, cfg)
        train_ids, n_mask = next(f for f in splits if f["fold"] == args.fold)["train"], 0
    fold = next(f for f in splits if f["fold"] == args.fold)
    train, held = records.subset_ids(train_ids), records.subset_ids(fold["test"])
    x0, labels = training_tensors(train, n_mask)
    if args.run is None:
        generators = {}
        for proc in GRID:
            log(f"training a {proc} generator: {train_steps} steps, {len(train)} images")
            generators[proc] = train_generator(cfg, {"process": proc}, x0, labels, train_steps,
                                               int(fingerprint["num_classes"]))[:2]

    # 2. The encoder (real training part only), held-out features and the real-vs-real scale.
    q = cfg.quality
    encoder = train_encoder(train.images, train.labels, cfg.data.dims, q.feature_dim, q.encoder_epochs, cfg.seed)
    held_f = encoder.features(held.images)
    counts = eval_label_counts({int(c): int(np.sum(held.labels == c)) for c in np.unique(held.labels)}, n)
    eval_labels = np.concatenate([np.full(k, c, dtype=np.int64) for c, k in sorted(counts.items())])
    seeds = [derive_seed(cfg.seed, 3, j) % 2**63 for j in range(n)]
    ref_idx = np.random.default_rng(cfg.seed).choice(len(train), min(n, len(train)), replace=False)
    reference_fd = frechet_distance(held_f, encoder.features(train.images[ref_idx]), covariance=COVARIANCE)

    # 3. Every sampler of every process on the same seeds, one batch each.
    rows = []
    for proc, (model, process) in generators.items():
        counter = CountingModel(model)
        for sampler, steps in GRID[proc]:
            counter.calls = 0
            r = sample_quality(counter, process, sampler=sampler, steps=steps, labels=eval_labels, seeds=seeds,
                               shape=tuple(x0.shape[1:]), num_mask_classes=n_mask, encoder=encoder,
                               real_features=held_f, batch_size=n, kid_seed=cfg.seed)
            rows.append({"process": proc, "sampler": sampler, "steps": steps, "nfe": counter.calls, "fd": r["fd"],
                         "kid": r["kid"], "ms_per_sample": 1000 * r["seconds"] / n})
            log(f"  {proc} {sampler} {steps}: FD {r['fd']:.4g}, {rows[-1]['ms_per_sample']:.1f} ms/sample")
    # Ancestral DDPM at 1000 steps when present; for a gamma-process run, its most expensive sampler.
    base = next((r for r in rows if (r["process"], r["sampler"], r["steps"]) == BASELINE), None) or max(
        rows, key=lambda r: r["nfe"])
    base_name = f"{base['process']} {base['sampler']} {base['steps']}"
    for r in rows:
        r["speedup"] = base["ms_per_sample"] / r["ms_per_sample"]
        r["fd_ratio"] = r["fd"] / base["fd"] if base["fd"] > 0 else float("nan")

    # 4. The table, side by side.
    print(f"\nsamplers: {n} samples/sampler at {cfg.data.image_size}^{cfg.data.dims}, "
          f"{'run ' + str(args.run) + ' fold ' + str(args.fold) if args.run else f'{train_steps} training steps'}, "
          f"{len(held)} held-out real images, torch threads {args.threads}, {platform.processor() or platform.machine()}")
    print(f"real-vs-real FD ({min(n, len(train))} training vs {len(held)} held-out images): {reference_fd:.4g}\n")
    head = (f"{'process':8} {'sampler':12} {'steps':>5} {'NFE':>5} {'FD':>8} {'KID':>8} {'ms/sample':>10} "
            f"{'speed-up':>9} {'FD/FD_base':>10}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['process']:8} {r['sampler']:12} {r['steps']:>5} {r['nfe']:>5} {r['fd']:>8.4g} {r['kid']:>8.4f} "
              f"{r['ms_per_sample']:>10.1f} {r['speedup']:>8.1f}x {r['fd_ratio']:>10.2f}")
    print(f"\nbase = {base_name}; speed-up = base time / sampler time, FD/FD_base = sampler FD / base FD, "
          f"measured side by side in this run. Total {time.perf_counter() - t_start:.0f}s.")
    if args.json:
        args.json.write_text(json.dumps({"samples": n, "train_steps": None if args.run else train_steps,
                                         "run": str(args.run) if args.run else None, "fold": args.fold,
                                         "image_size": cfg.data.image_size, "threads": args.threads,
                                         "reference_fd": reference_fd, "base": base_name,
                                         "encoder": encoder.description,
                                         "rows": rows}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
