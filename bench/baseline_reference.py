"""Benchmark (issue 16): is the study's baseline strong? Its CNN against simple references, same splits.

    .venv/bin/python bench/real_study.py ... is the study; this is its yardstick:
    .venv/bin/python bench/baseline_reference.py [--data DIR] [--json out.json]

On ``../shared/data/brain-tumor-mri-4class/Training`` prepared exactly as ``bench/real_study.py``
prepares it (32x32, 3 folds, the same splits and nested 25% subsets), for each split and real
fraction (100%, 25%), the balanced accuracy on the split's real test part of:

- **logistic regression on pixels** (scikit-learn, standardised pixels, L2, C chosen by 3-fold
  CV inside the training part: the simple reference the issue asks for);
- **the study's baseline CNN** (``downstream.models.fit_and_evaluate`` with the study settings of
  ``bench/real_study.py``: 20 epochs, width 16, seed 0) and its **classical** arm (MONAI
  augmentation), the two arms a synthetic arm must beat.

A gain from synthetic data over a baseline that a logistic regression matches would be no gain.
Prints per-fraction means over splits, with their paired differences to the CNN.
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
from real_study import COMMON, SHARED, cpu  # noqa: E402  (the study's own settings and data)

from raysynth.artifacts import Layout, read_prepared, read_subsets  # noqa: E402
from raysynth.config import load_config  # noqa: E402
from raysynth.design import Condition, augment_for  # noqa: E402
from raysynth.downstream.models import fit_and_evaluate  # noqa: E402
from raysynth.stages.prepare import prepare  # noqa: E402


def logistic(train, test, seed: int) -> float:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0], cv=3, max_iter=3000,
                                                                 random_state=seed))
    model.fit(train.images.reshape(len(train), -1), train.labels)
    return float(balanced_accuracy_score(test.labels, model.predict(test.images.reshape(len(test), -1))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "brain-tumor-mri-4class" / "Training"))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config("default", None, [f"data.source={args.data}", *COMMON])
    layout = Layout.at(tempfile.mkdtemp(prefix="bench-baseline-"))
    prepare(cfg, layout)
    records, fingerprint, splits = read_prepared(layout, cfg)
    subsets = read_subsets(layout, cfg)
    st = cfg.study
    rows = []
    t0 = time.perf_counter()
    for split in splits:
        k, test = split["fold"], records.subset_ids(split["test"])
        for fraction in sorted(st.real_fractions, reverse=True):
            train = records.subset_ids(subsets[k][fraction])
            row = {"fold": k, "fraction": fraction, "n_train": len(train), "logistic": logistic(train, test, 0)}
            for arm in ("baseline", "classical"):
                r = fit_and_evaluate("classification", train, test, num_classes=int(fingerprint["num_classes"]),
                                     num_mask_classes=None, epochs=st.epochs, batch_size=st.batch_size,
                                     learning_rate=st.lr_for("classification"), width=st.width, seed=0,
                                     augment=augment_for(Condition(arm, None), 2, 0, False))
                row[arm] = float(r["metrics"]["balanced_accuracy"])
            rows.append(row)
            print(f"fold {k} {fraction:.0%}: " + ", ".join(f"{a} {row[a]:.3f}" for a in ("logistic", "baseline", "classical")),
                  file=sys.stderr, flush=True)
    print(f"\nCPU: {cpu()}. Data: {args.data}, {len(records)} images at 32x32, {len(splits)} splits "
          f"(the study's, bench/real_study.py settings). Chance: {1 / int(fingerprint['num_classes']):.2f}. "
          f"{(time.perf_counter() - t0) / 60:.1f} min.\n")
    print("| real data | n train | logistic regression on pixels | baseline CNN | classical CNN | CNN - logistic (per split) |")
    print("|---|---|---|---|---|---|")
    for fraction in sorted(st.real_fractions, reverse=True):
        sel = [r for r in rows if r["fraction"] == fraction]
        mean = {a: np.mean([r[a] for r in sel]) for a in ("logistic", "baseline", "classical")}
        diffs = ", ".join(f"{r['baseline'] - r['logistic']:+.3f}" for r in sel)
        print(f"| {fraction:.0%} | {np.mean([r['n_train'] for r in sel]):.0f} | {mean['logistic']:.3f} | "
              f"{mean['baseline']:.3f} | {mean['classical']:.3f} | {diffs} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
