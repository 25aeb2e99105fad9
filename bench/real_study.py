"""The full study design on real brain MRI (a benchmark, not a test): does synthetic data help?

    .venv/bin/python bench/real_study.py --dataset 4class|seg2d [--data DIR] [--out DIR] [--set key=value ...]
                                         [--benchmarks BENCHMARKS.md]

Runs prepare -> train -> sample -> quality -> study -> robustness -> report on one of the real
sets in ``../shared/data`` (beside the checkout; read in place, never copied), with a config sized
for a 2-core CPU machine: 32x32 images, 3-fold CV, real fractions 25% and 100% (one generator per
fold and fraction, trained only on that fraction's subset), ratio 1, and every arm that fits.

- ``4class``: ``brain-tumor-mri-4class/Training`` (4 classes of JPEG slices), classification.
- ``seg2d``: ``brain-mri-seg2d`` (242 FLAIR-abnormality slices of 7 LGG patients), segmentation,
  split by patient (``data.subject_pattern``), its three sequences (T1, FLAIR, T1c in the RGB
  channels) as three input channels (``data.channels=rgb``).

Every stage skips finished work, so rerunning the same command after a crash
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
from raysynth.render.text import fmt, num

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Sized for 2 CPU cores and ~40 minutes; each line says what it trades away.
COMMON = [
    "data.image_size=32",                        # 4x fewer pixels than the default 64
    "cv.folds=3",                                # 3 splits: the least that gives every test a variance
    "diffusion.channels=[32,64]",                # a two-level UNet; the default has three
    "diffusion.train_steps=600",                 # far below a converged DDPM (tens of thousands)
    "diffusion.batch_size=32",
    "diffusion.checkpoint_every=300",
    "diffusion.log_every=100",
    "sampling.steps=20",
    "sampling.max_actors=2",
    "study.ratios=[1]",
    "study.real_fractions=[0.25,1.0]",
    "study.seeds=[0]",
    "study.epochs=20",
    "study.width=16",
    "quality.encoder_epochs=5",
]
DATASETS = {
    "4class": {
        "heading": "## Real-data study: brain-tumor-mri-4class (classification, {generator} generator)",
        "data": SHARED / "brain-tumor-mri-4class" / "Training",
        "settings": ["study.arms=[baseline,classical,synthetic,synthetic+classical,synthetic_only,synthetic_pretrain]"],
        "metrics": ("balanced_accuracy", "auc"),
    },
    "seg2d": {
        "heading": "## Real-data study: brain-mri-seg2d (segmentation, split by patient, {generator} generator)",
        "data": SHARED / "brain-mri-seg2d",
        "settings": ["data.task=segmentation", "data.channels=rgb", "data.subject_pattern=^(TCGA_[A-Z]{2}_[0-9]{4})",
                     "study.arms=[baseline,classical,synthetic,synthetic+classical,synthetic_pretrain]"],
        "metrics": ("mean_dice", "mean_hd95"),
    },
}
SETTINGS: list[str] = []
METRICS: tuple[str, ...] = ()
HEADING = ""
DATASET = ""


def cpu() -> str:
    """The CPU model and its vector extensions, as BENCHMARKS.md states them with every timing."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(ext) or 'no AVX2'})"


def generator_name(cfg) -> str:
    """How the heading names the generator, so that runs with different generators keep their own sections."""
    d = cfg.diffusion
    if d.process == "flow":
        return f"rectified-flow, {cfg.sampling.sampler} {cfg.sampling.steps}-step"
    return f"{d.process.upper()}-{d.prediction_type}"


def run(data: str, out: str, extra: list[str]) -> tuple[dict, dict, object]:
    cfg = load_config("default", None, [f"data.source={data}", *SETTINGS, *extra])
    layout = Layout.at(out)
    timings = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {stage} ...", flush=True)
        run_stage(stage, cfg, layout, enforce_gate=False)  # the gate's verdict is reported below
        timings[stage] = round(time.perf_counter() - t0, 1)
        print(f"[{time.strftime('%H:%M:%S')}] {stage} done in {timings[stage]:.0f}s", flush=True)
    return read_json(layout.report / "report.json"), timings, cfg


def tables(report: dict) -> list[str]:
    """Markdown tables: per size and arm, mean [corrected 95% CI]; then the paired comparisons."""
    lines = ["| real data (n per split) | arm | " + " | ".join(m.replace("_", " ") for m in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    sizes = report["design"]["sizes"]
    for p in sorted(report["summary"], key=float, reverse=True):
        for c in report["design"]["conditions"]:
            cell = report["summary"][p].get(c)
            if cell:
                vals = [f"{fmt(cell[m]['mean'])} [{fmt(cell[m]['nb_ci_low'])}, {fmt(cell[m]['nb_ci_high'])}]"
                        if m in cell else "n/a" for m in METRICS]
                lines.append(f"| {float(p):.0%} ({sizes[p]['n_real']:.0f}) | {c} | " + " | ".join(vals) + " |")
    lines += ["", "| real data | arm - baseline | metric | mean diff | corrected 95% CI | bootstrap 95% CI | "
              "corrected p (Holm) | paired t p | Wilcoxon p |", "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(report["comparisons"], key=float, reverse=True):
        for c, by_metric in report["comparisons"][p].items():
            for m in METRICS:
                r = by_metric.get(m, {})
                if "mean_diff" in r:
                    d = {k: num(r.get(k), "+.3f") for k in ("mean_diff", "nb_ci_low", "nb_ci_high", "boot_ci_low", "boot_ci_high")}
                    lines.append(f"| {float(p):.0%} | {c} | {m} | {d['mean_diff']} | [{d['nb_ci_low']}, {d['nb_ci_high']}] | "
                                 f"[{d['boot_ci_low']}, {d['boot_ci_high']}] | {fmt(r.get('nb_p'))} ({fmt(r.get('nb_p_holm'))}) | "
                                 f"{fmt(r.get('t_p'))} | {fmt(r.get('wilcoxon_p'))} |")
    return lines


def section(report: dict, timings: dict, cfg, out: str) -> str:
    machine = f"{os.cpu_count()} cores of {cpu()}, no GPU, shared with other jobs"
    gens = report["generators"]
    lines = [
        HEADING, "",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {machine}. Command: `.venv/bin/python bench/real_study.py "
        f"--dataset {DATASET} --out {out} --benchmarks BENCHMARKS.md`. Data: `{cfg.data.source}` ({report['data'].get('num_records')} images, "
        + ", ".join(f"{k} {v}" for k, v in report["data"].get("counts", {}).items()) + "), read in place.",
        "",
        "Method: the default preset with these overrides (sized for 2 cores): `" + "`, `".join(SETTINGS) + "`. "
        f"{report['design']['folds_per_repeat']}-fold stratified CV; every arm uses the same splits and seed; one "
        f"generator per split and real-data size ({len(gens)} in all), each trained only on that size's nested subset. "
        "Intervals of single arms are Nadeau-Bengio corrected 95% t intervals over splits; comparisons are paired by "
        "split, with the corrected resampled t-test as the primary test and Holm across the arms at one size.",
        "",
        _duplicates_line(out),
        "",
        _gate_line(report),
        "",
        "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f"; total {sum(timings.values()) / 60:.1f} min.",
        "",
        *tables(report),
        "",
    ]
    return "\n".join(lines)


def _duplicates_line(out: str) -> str:
    d = read_json(Layout.at(out).fingerprint).get("duplicates", {})
    return (f"Duplicates (`data.duplicates={d.get('policy')}`, {d.get('method')}, threshold {d.get('threshold')}): "
            f"{d.get('num_groups')} groups holding {d.get('num_grouped_images')} images "
            f"({d.get('num_exact')} exact copies), each group made one subject so that it never spans folds.")


def _gate_line(report: dict) -> str:
    q = report.get("quality") or {}
    gate = q.get("gate", {})
    thresholds = ", ".join(fmt(v) for v in gate.get("effective_thresholds", {}).values())
    verdict = q.get("privacy_verdict") or ("passed" if q.get("privacy_passed") else "failed")
    return (f"Privacy gate: {verdict}; effective NCC thresholds per "
            f"split (the held-out real images' {gate.get('reference_quantile')} quantile, at least "
            f"{gate.get('ncc_threshold')}): {thresholds}.")


def update_benchmarks(path: Path, text: str) -> None:
    """Replace this section (up to the next ``## `` heading) or append it; other sections stay."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main() -> None:
    global SETTINGS, METRICS, HEADING, DATASET
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="4class")
    parser.add_argument("--data", help="the set's folder (default: ../shared/data/<set>)")
    parser.add_argument("--out", help="output folder (default: runs/real_study_<set>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    parser.add_argument("--benchmarks", help="write the results into this Markdown file (e.g. BENCHMARKS.md)")
    args = parser.parse_args()
    profile = DATASETS[args.dataset]
    DATASET, HEADING, METRICS = args.dataset, profile["heading"], profile["metrics"]
    SETTINGS = [*COMMON, *profile["settings"]]
    args.data = args.data or str(profile["data"])
    if not Path(args.data).is_dir():
        raise SystemExit(f"real_study: no data at {args.data}")
    args.out = args.out or f"runs/real_study_{args.dataset}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    report, timings, cfg = run(args.data, args.out, args.overrides)
    HEADING = HEADING.format(generator=generator_name(cfg))
    text = section(report, timings, cfg, args.out)
    print("\n" + text)
    if args.benchmarks:
        update_benchmarks(Path(args.benchmarks), text)
        print(f"wrote {args.benchmarks}")


if __name__ == "__main__":
    main()
