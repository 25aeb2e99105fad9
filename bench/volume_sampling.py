"""Time per synthetic 3D sample at the CPU default size (a benchmark, not a test).

    .venv/bin/python bench/volume_sampling.py [--size 32] [--steps 25] [--batch 4] [--threads 2]

Uses the default preset's 3D denoiser (MONAI DiffusionModelUNet, spatial_dims=3) and sampler. The
weights are untrained: the cost of a network evaluation does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import torch

from raysynth.config import load_config
from raysynth.diffusion.networks import build_denoiser
from raysynth.diffusion.process import build_process


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="default: the preset's sampling.steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("default", None, ["data.dims=3", f"data.image_size={args.size}"])
    steps = args.steps or cfg.sampling.steps
    model = build_denoiser(cfg.diffusion, dims=3, in_channels=1, image_size=args.size, num_classes=2).eval()
    process = build_process(cfg.diffusion)
    labels = torch.zeros(args.batch, dtype=torch.long)
    shape = (1, args.size, args.size, args.size)
    times = []
    for r in range(args.repeats + 1):
        gens = [torch.Generator().manual_seed(r * 100 + i) for i in range(args.batch)]
        t0 = time.perf_counter()
        process.sample(model, labels, shape, cfg.sampling.sampler, steps, gens)
        if r:  # the first pass warms up allocators and kernels
            times.append((time.perf_counter() - t0) / args.batch)
    times.sort()
    print(f"3D {args.size}^3, channels {cfg.diffusion.channels}, {cfg.sampling.sampler} {steps} steps, batch {args.batch}, "
          f"{args.threads} threads: {times[len(times) // 2]:.2f} s per sample (median of {len(times)}; min {times[0]:.2f})")


if __name__ == "__main__":
    main()
