"""The full study design on real brain MRI (a benchmark, not a test): does synthetic data help?

    .venv/bin/python bench/real_study.py [--data DIR] [--out DIR] [--set key=value ...] [--benchmarks BENCHMARKS.md]

Runs prepare -> train -> sample -> quality -> study -> report on a class-folder image set (by
default /work/shared/data/brain-tumor-mri-4class/Training: 4 classes, 399 JPEGs) with a config
sized for a 2-core CPU machine in about 40 minutes: 32x32 images, 3-fold CV, real fractions 25%
and 100% (one generator per fold and fraction, trained only on that fraction's subset), ratio 1,
and all five arms. Every stage skips finished work, so rerunning the same command after a crash
resumes. Prints, per arm and real-data size, the mean and 95% CI of balanced accuracy and AUC and
the paired comparisons against baseline; with ``--benchmarks`` it also writes them to that file
under the heading below, replacing an earlier version of the section and keeping the others.
The data is read in place, never copied into the repository.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import time
from pathlib import Path

from raysynth.config import load_config
from raysynth.artifacts import Layout, read_json
from raysynth.pipeline import STAGES, run_stage

HEADING = "## Real-data study: brain-tumor-mri-4class"
DATA = "/work/shared/data/brain-tumor-mri-4class/Training"

# Sized for 2 CPU cores and ~40 minutes; each line says what it trades away.
SETTINGS = [
    "data.image_size=32",                        # 4x fewer pixels than the default 64
    "cv.folds=3",                                # 3 splits: the least that gives every test a variance
    "diffusion.channels=[32,64]",                # a two-level UNet; the default has three
    "diffusion.train_steps=600",                 # far below a converged DDPM (tens of thousands)
    "diffusion.batch_size=32",
    "diffusion.checkpoint_every=300",
    "diffusion.log_every=100",
    "sampling.steps=20",
    "sampling.max_actors=2",
    "study.arms=[baseline,classical,synthetic,synthetic+classical,synthetic_only]",
    "study.ratios=[1]",
    "study.real_fractions=[0.25,1.0]",
    "study.seeds=[0]",
    "study.epochs=20",
    "study.width=16",
    "quality.encoder_epochs=5",
]
METRICS = ("balanced_accuracy", "auc")


def run(data: str, out: str, extra: list[str]) -> tuple[dict, dict, object]:
    cfg = load_config("default", None, [f"data.source={data}", *SETTINGS, *extra])
    layout = Layout.at(out)
    timings = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {stage} ...", flush=True)
        run_stage(stage, cfg, layout)
        timings[stage] = round(time.perf_counter() - t0, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {stage} done in {timings[stage]:.0f}s", flush=True)
    return read_json(layout.report / "report.json"), timings, cfg


def tables(report: dict) -> list[str]:
    """Markdown tables: per size and arm, mean [corrected 95% CI]; then the paired comparisons."""
    lines = ["| real data (n per split) | arm | balanced accuracy | AUC |", "|---|---|---|---|"]
    sizes = report["design"]["sizes"]
    for p in sorted(report["summary"], key=float, reverse=True):
        for c in report["design"]["conditions"]:
            cell = report["summary"][p].get(c)
            if cell:
                vals = [f"{cell[m]['mean']:.3f} [{cell[m]['nb_ci_low']:.3f}, {cell[m]['nb_ci_high']:.3f}]"
                        if m in cell else "n/a" for m in METRICS]
                lines.append(f"| {float(p):.0%} ({sizes[p]['n_real']:.0f}) | {c} | " + " | ".join(vals) + " |")
    lines += ["", "| real data | arm - baseline | metric | mean diff | corrected 95% CI | bootstrap 95% CI | "
              "corrected p (Holm) | paired t p | Wilcoxon p |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(report["comparisons"], key=float, reverse=True):
        for c, by_metric in report["comparisons"][p].items():
            for m in METRICS:
                r = by_metric.get(m, {})
                if "mean_diff" in r:
                    lines.append(f"| {float(p):.0%} | {c} | {m} | {r['mean_diff']:+.3f} | [{r['nb_ci_low']:+.3f}, "
                                 f"{r['nb_ci_high']:+.3f}] | [{r['boot_ci_low']:+.3f}, "
                                 f"{r['boot_ci_high']:+.3f}] | {r['nb_p']:.3f} ({r['nb_p_holm']:.3f}) | {r['t_p']:.3f} | "
                                 f"{r['wilcoxon_p']:.3f} |")
    return lines


def section(report: dict, timings: dict, cfg, out: str) -> str:
    machine = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU, shared with other jobs"
    gens = report["generators"]
    lines = [
        HEADING, "",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {machine}. Command: `.venv/bin/python bench/real_study.py "
        f"--out {out} --benchmarks BENCHMARKS.md`. Data: `{cfg.data.source}` ({report['data'].get('num_records')} images, "
        + ", ".join(f"{k} {v}" for k, v in report["data"].get("counts", {}).items()) + "), read in place.",
        "",
        "Method: the default preset with these overrides (sized for 2 cores): `" + "`, `".join(SETTINGS) + "`. "
        f"{report['design']['folds_per_repeat']}-fold stratified CV; every arm uses the same splits and seed; one "
        f"generator per split and real-data size ({len(gens)} in all), each trained only on that size's nested subset. "
        "Intervals of single arms are Nadeau-Bengio corrected 95% t intervals over splits; comparisons are paired by "
        "split, with the corrected resampled t-test as the primary test and Holm across the arms at one size.",
        "",
        "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"; total {sum(timings.values()) / 60:.1f} min.",
        "",
        *tables(report),
        "",
    ]
    return "\n".join(lines)


def update_benchmarks(path: Path, text: str) -> None:
    """Replace this section (up to the next ``## `` heading) or append it; other sections stay."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--out", default="runs/real_study")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--benchmarks", help="write the results into this Markdown file (e.g. BENCHMARKS.md)")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        raise SystemExit(f"real_study: no data at {args.data}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    report, timings, cfg = run(args.data, args.out, args.overrides)
    text = section(report, timings, cfg, args.out)
    print("\n" + text)
    if args.benchmarks:
        update_benchmarks(Path(args.benchmarks), text)
        print(f"wrote {args.benchmarks}")


if __name__ == "__main__":
    main()
