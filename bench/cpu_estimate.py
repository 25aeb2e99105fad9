"""Benchmark (issue 18): the pipeline's own time estimate on this CPU and with its kernels held to AVX2.

    .venv/bin/python bench/cpu_estimate.py [--presets default latent] [--repeats 3]

CPUs here differ by about 3x (AVX-512 with bf16 against AVX2 only). Where only an AVX-512 machine
is at hand, ``ATEN_CPU_CAPABILITY=avx2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` make PyTorch and oneDNN
pick the AVX2 kernels an AVX2-only machine would run. For each preset this runs the calibration
that ``raysynth pipeline`` logs before training (:func:`raysynth.estimate.estimate_run`: a few
steps of the run's own networks, with one worker's threads) in a fresh process per setting,
alternating settings over ``--repeats`` rounds, and prints the medians and their ratio. It is an
estimate from short calibrations, not an end-to-end run: Ray's start-up, the study and
robustness come on top, and a real AVX2 machine's memory system differs too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_study import cpu  # noqa: E402

SETTINGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
CHILD = r"""
import json, sys
import torch
from raysynth.config import load_config
from raysynth.estimate import estimate_run
cfg = load_config(sys.argv[1])
fp = {"shape": [1] + [cfg.data.image_size] * cfg.data.dims, "num_classes": 2, "num_mask_classes": 0}
share = (cfg.cv.folds - 1) / cfg.cv.folds
samples = int(round(cfg.data.num_scans * share * cfg.sampling.ratio))
e = estimate_run(cfg, fp, slots=int(sys.argv[2]), samples_per_generator=samples)
print(json.dumps({"estimate": e, "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def run(preset: str, env: dict, slots: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, preset, str(slots)], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["default", "latent"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slots", type=int, default=2, help="fits at once (2 on a 2-core machine)")
    args = p.parse_args(argv)
    print(f"CPU: {cpu()}; {os.cpu_count()} cores; fits at once: {args.slots}\n")
    print("| preset | kernels | train s/step | autoencoder s/step | estimated minutes before the study | avx2 / native |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        got: dict[str, list[dict]] = {k: [] for k in SETTINGS}
        for _ in range(args.repeats):
            for name, env in SETTINGS.items():  # alternating, so drift hits both
                got[name].append(run(preset, env, args.slots))
        medians = {}
        for name, runs in got.items():
            est = [r["estimate"] for r in runs]
            medians[name] = statistics.median(e["seconds"] for e in est) / 60
            ae = [e["autoencoder"]["seconds_per_step"] for e in est if "autoencoder" in e]
            ae_cell = f"{statistics.median(ae):.3f}" if ae else "n/a"
            ratio = f"{medians['avx2'] / medians['native']:.2f}x" if name == "avx2" else ""
            train = statistics.median(e["train"]["seconds_per_step"] for e in est)
            print(f"| {preset} | {name} ({runs[0]['capability']}) | {train:.3f} | {ae_cell} | {medians[name]:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
