"""The 3D path on real NIfTI volumes (a benchmark, not a test): what works on ``brain-mri-3d``.

    .venv/bin/python bench/real_3d.py [--data DIR] [--out DIR]

``../shared/data/brain-mri-3d`` holds 22 volumes of 13 subjects: 10 healthy IXI T1 (2 mm, skull on,
120x120x90), 2 TCGA-LGG glioma cases with 4 sequences and a tumour mask beside each sequence
(1 mm, skull-stripped, 240x240x155), and 1 BraTS case with 4 sequences and no mask. Its
``labels.csv`` has one row per sequence file and extra columns (subject, modality, age, ...).

Each check below is a real use a researcher would try; each prints what came out, or the one-line
error raysynth gave, and nothing is retried or tuned:

1. ``prepare`` 3D, one channel, classification on all 22 files (``labels.csv`` subjects keep the
   4 sequence files of one glioma case in one fold; duplicates searched in 3D).
2. ``prepare`` 3D, ``data.channels=[t1,t1c,t2,flair]``, segmentation: the IXI volumes lack the
   sequences (skipped with ``data.bad_files=skip``); the BraTS case has no mask (a one-line error).
3. The same on a folder of links to the two masked glioma cases only (what a user would assemble):
   the 4-channel 3D segmentation pipeline, end to end (prepare -> train -> sample -> quality ->
   study -> report) at the smoke size, 2 folds of 1 patient each, at the smoke ratio 0.5 and at 2. A
   does-it-run check: one training volume per fold says nothing about Dice.
4. 2D slices of the 4-channel glioma volumes (``data.dims=2``, 8 axial slices per volume).

The data is read in place (links, never copies); outputs go to ``--out`` (default /tmp).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
from pathlib import Path

from raysynth.artifacts import Layout, read_json
from raysynth.config import load_config
from raysynth.errors import InputError
from raysynth.pipeline import STAGES, run_stage
from real_study import cpu  # bench/ is on sys.path when a bench script runs

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain-mri-3d"
SEQUENCES = "[t1,t1c,t2,flair]"


def attempt(name: str, source: Path, out: Path, overrides: list[str], stages=("prepare",)) -> dict:
    cfg = load_config("smoke", None, [f"data.source={source}", *overrides])
    layout = Layout.at(out / name)
    row = {"check": name, "overrides": overrides, "stages": list(stages)}
    t0 = time.perf_counter()
    try:
        for stage in stages:
            run_stage(stage, cfg, layout, enforce_gate=False)
        fp = read_json(layout.fingerprint)
        row.update(ok=True, records=fp["num_records"], subjects=fp["num_subjects"], shape=fp["shape"],
                   channels=fp.get("channels"), counts=fp["counts"], skipped=fp.get("skipped", []),
                   duplicates={k: fp["duplicates"].get(k) for k in ("num_groups", "num_grouped_images", "threshold")},
                   spacing=fp.get("spacing"))
        if "report" in stages:
            report = read_json(layout.report / "report.json")
            row["summary"] = {p: {c: {m: v.get("mean") for m, v in cell.items() if isinstance(v, dict)}
                                  for c, cell in by_c.items()} for p, by_c in report["summary"].items()}
            row["privacy"] = (report.get("quality") or {}).get("privacy_verdict")
    except InputError as exc:
        row.update(ok=False, error=str(exc))
    except Exception as exc:  # a crash is a finding too: record it and go on
        row.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=3))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row, default=str), flush=True)
    return row


def glioma_folder(data: Path, dest: Path) -> Path:
    """Links to the two masked TCGA cases and a labels.csv listing them: what a user would assemble."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in sorted(data.glob("TCGA-*.nii.gz")):
        link = dest / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
        if not f.name.endswith("_seg.nii.gz") and f.name.endswith("_t1.nii.gz"):
            rows.append(f"{f.name},glioma_LGG")
    (dest / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED))
    parser.add_argument("--out", default="/tmp/real_3d")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    if not data.is_dir():
        raise SystemExit(f"real_3d: no data at {data}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    print(f"machine: {os.cpu_count()} cores of {cpu()}; date {time.strftime('%Y-%m-%d')}", flush=True)
    glioma = glioma_folder(data, out / "glioma_links")
    seg = ["data.dims=3", "data.task=segmentation", f"data.channels={SEQUENCES}"]
    rows = [
        attempt("3d_grey_classification_all", data, out, ["data.dims=3"]),
        attempt("3d_4ch_segmentation_all_skip", data, out, [*seg, "data.bad_files=skip"]),
        attempt("3d_4ch_segmentation_glioma_pipeline", glioma, out, seg, stages=STAGES),
        # One training volume per fold: the smoke ratio 0.5 x 1 rounds to no synthetic sample.
        attempt("3d_4ch_segmentation_glioma_pipeline_ratio2", glioma, out, [*seg, "sampling.ratio=2"], stages=STAGES),
        attempt("2d_slices_4ch_segmentation_glioma", glioma, out,
                ["data.dims=2", "data.task=segmentation", f"data.channels={SEQUENCES}", "data.slices_per_volume=8",
                 "data.image_size=32"]),
    ]
    (out / "real_3d.json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"wrote {out / 'real_3d.json'}")


if __name__ == "__main__":
    main()
