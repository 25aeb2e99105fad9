"""Benchmark (issue 17): the latent path's 3D autoencoder on real volumes, and NIfTI orientation.

    .venv/bin/python bench/latent_3d.py [--data DIR] [--size 64] [--steps 300] [--png out.png] [--json out.json]

On the 10 healthy IXI T1 volumes of ``../shared/data/brain-mri-3d`` (2 mm, skull on; read in place
through links), prepared as ``raysynth prepare --preset latent3d`` does at ``--size``^3, split by
subject (fold 0 of 3: 6-7 training, 3-4 test subjects):

1. the ``latent3d`` preset's autoencoder trained on the 8 training volumes for ``--steps`` steps;
2. its reconstruction of the 2 *test* volumes: PSNR, SSIM, MS-SSIM (the quality stage's measure);
3. orientation: a prepared volume and its reconstruction written with raysynth's NIfTI writer
   (as synthetic volumes are) must read back as RAS with the input's axis order and directions:
   it must correlate with the input brought to canonical RAS (``nib.as_closest_canonical``) and
   resampled to its grid better than with that input flipped along any axis.

Prints what came out; ``--png`` draws the three mid-planes of a test volume and its reconstruction.
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

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_fidelity import log, train_autoencoder  # noqa: E402  (the autoencoder stage's fit, in process)
from real_study import SHARED, cpu  # noqa: E402

from raysynth.artifacts import Layout, read_prepared  # noqa: E402
from raysynth.config import load_config  # noqa: E402
from raysynth.data.nifti import write_volume  # noqa: E402
from raysynth.diffusion.autoencoder import decode, encode  # noqa: E402
from raysynth.quality.reconstruction import reconstruction_metrics  # noqa: E402
from raysynth.stages.prepare import prepare  # noqa: E402


def ixi_folder(data: Path, dest: Path) -> Path:
    """Links to the IXI T1 volumes and a labels.csv with their subjects. The label is the subject's
    sex from the set's labels.csv: prepare's classification needs two classes, and the
    autoencoder, which is all this bench trains, never sees a label."""
    import csv

    sex = {r["file"]: r["sex"] for r in csv.DictReader((data / "labels.csv").open())}
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in sorted(data.glob("IXI*_T1.nii.gz")):
        (dest / f.name).symlink_to(f.resolve())
        rows.append(f"{f.name},{sex[f.name]},{f.name.split('_')[0]}")
    (dest / "labels.csv").write_text("file,label,subject\n" + "\n".join(rows) + "\n")
    return dest


def _standardise(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / (v.std() + 1e-8)


def orientation_check(written: Path, source: Path) -> dict:
    """Axis codes of the written file, and its correlation with the input brought to canonical RAS
    (``nib.as_closest_canonical``), padded to a cube and resampled to the written grid, against the
    same input flipped along each axis: the written volume must match the unflipped input best."""
    from scipy.ndimage import zoom

    out = nib.load(str(written))
    mine = _standardise(np.asarray(out.dataobj, dtype=np.float32))
    canonical = np.asarray(nib.as_closest_canonical(nib.load(str(source))).dataobj, dtype=np.float32)
    side = max(canonical.shape)
    cube = np.zeros((side,) * 3, np.float32) + canonical.min()
    lo = [(side - n) // 2 for n in canonical.shape]
    cube[lo[0]:lo[0] + canonical.shape[0], lo[1]:lo[1] + canonical.shape[1], lo[2]:lo[2] + canonical.shape[2]] = canonical
    ref = _standardise(zoom(cube, [m / side for m in mine.shape], order=1))
    corr = lambda v: float(np.mean(mine * _standardise(v)))  # noqa: E731
    result = {"axcodes": "".join(nib.aff2axcodes(out.affine)), "corr": corr(ref),
              "corr_flipped": {"xyz"[a]: corr(np.flip(ref, axis=a)) for a in range(3)}}
    result["ok"] = result["axcodes"] == "RAS" and all(result["corr"] > c for c in result["corr_flipped"].values())
    return result


def save_planes(path: Path, real: np.ndarray, recon: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(7.5, 5.2))
    for r, (name, v) in enumerate((("real test volume", real), ("autoencoder reconstruction", recon))):
        c = [s // 2 for s in v.shape]
        for k, (plane, img) in enumerate((("sagittal (x)", v[c[0]]), ("coronal (y)", v[:, c[1]]), ("axial (z)", v[:, :, c[2]]))):
            axes[r, k].imshow(np.rot90(img), cmap="gray", vmin=-1, vmax=1)
            axes[r, k].set_title(f"{name}\n{plane}" if k == 0 else plane, fontsize=8)
            axes[r, k].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(SHARED / "brain-mri-3d"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--png", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bench-latent-3d-"))
    source = ixi_folder(Path(args.data), scratch / "ixi")
    bf16 = str(torch.backends.mkldnn.is_available() and "avx512_bf16" in cpu()).lower()
    cfg = load_config("latent3d", None, [f"data.source={source}", f"data.image_size={args.size}", "cv.folds=3",
                                         f"diffusion.cpu_bf16={bf16}", "autoencoder.batch_size=2"])
    layout = Layout.at(scratch / "out")
    prepare(cfg, layout)
    records, fingerprint, splits = read_prepared(layout, cfg)
    fold = splits[0]
    train, test = records.subset_ids(fold["train"]), records.subset_ids(fold["test"])
    log(f"{len(train)} training, {len(test)} test volumes of {fingerprint['shape']} at spacing {fingerprint.get('spacing')}")
    x0 = torch.from_numpy(train.images)
    ae, ae_s = train_autoencoder(cfg, x0, args.steps, cfg.seed)
    recon = reconstruction_metrics(ae, test.images, None, 0, batch_size=1)
    rec = decode(ae, encode(ae, torch.from_numpy(test.images[:1]), 1), 1).numpy()[0, 0]

    # Orientation: the writer synthetic volumes go through, on a prepared test volume and its reconstruction.
    sources = sorted(Path(args.data).glob("IXI*_T1.nii.gz"))
    spacing = tuple(fingerprint.get("spacing") or (1.0, 1.0, 1.0))
    checks = {}
    for name, volume in (("prepared", test.images[0, 0]), ("reconstruction", rec)):
        path = scratch / f"{name}.nii.gz"
        write_volume(path, volume, spacing)
        # Ids are anonymised: compare with every input and keep the best match (all share one acquisition).
        best = max((orientation_check(path, s) for s in sources), key=lambda r: r["corr"])
        checks[name] = best
    if args.png:
        save_planes(args.png, test.images[0, 0], rec)
    print(f"\nCPU: {cpu()}, torch threads {args.threads}, bf16 {bf16}. Data: {len(sources)} IXI T1 volumes of "
          f"{args.data} prepared at {args.size}^3 (spacing {spacing} mm), fold 0 of 3: {len(train)} training, "
          f"{len(test)} test subjects. Autoencoder {cfg.autoencoder.channels} (factor "
          f"{cfg.autoencoder.downsampling_factor}, {cfg.autoencoder.latent_channels} latent channels), {args.steps} "
          f"steps of batch {cfg.autoencoder.batch_size} in {ae_s:.0f}s. Total {(time.perf_counter() - t_start) / 60:.1f} min.\n")
    print("| test volumes | PSNR (dB) | SSIM | MS-SSIM (scales) | L1 |")
    print("|---|---|---|---|---|")
    ms = "n/a" if recon["ms_ssim"] is None else f"{recon['ms_ssim']:.3f}"
    print(f"| {recon['n']} | {recon['psnr']:.2f} | {recon['ssim']:.3f} | {ms} ({recon['ms_ssim_scales']}) | "
          f"{recon['l1']:.4f} |")
    print("\n| written volume | axis codes | corr with the canonical input | flipped in x | in y | in z | orientation ok |")
    print("|---|---|---|---|---|---|---|")
    for name, c in checks.items():
        flips = " | ".join(f"{c['corr_flipped'][a]:.3f}" for a in "xyz")
        print(f"| {name} | {c['axcodes']} | {c['corr']:.3f} | {flips} | {c['ok']} |")
    if args.json:
        args.json.write_text(json.dumps({"reconstruction": recon, "orientation": checks, "ae_seconds": ae_s,
                                         "steps": args.steps}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
