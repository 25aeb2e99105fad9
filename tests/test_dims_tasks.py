"""`--dims 2|3` x `--task classification|segmentation` all run through the same stages and artifacts.

2D classification is covered in depth by test_pipeline_e2e.py; here the other three combinations
run the smoke pipeline (shortened further) and check what is specific to them: NIfTI volumes,
masks generated with every image, segmentation metrics.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

from raysynth.cli import main
from raysynth.data.schema import read_parquet
from raysynth.artifacts import Layout, read_json

pytestmark = pytest.mark.slow

FAST = ["--set", "diffusion.train_steps=10", "--set", "diffusion.checkpoint_every=10", "--set", "study.epochs=1",
        "--set", "sampling.steps=3", "--set", "quality.encoder_epochs=1"]


@pytest.mark.parametrize("dims, task", [(2, "segmentation"), (3, "classification"), (3, "segmentation")])
def test_smoke_pipeline(ray_session, tmp_path, dims, task):
    out = tmp_path / f"{dims}d-{task}"
    code = main(["pipeline", "--preset", "smoke", "--dims", str(dims), "--task", task, "--out", str(out), "-q", *FAST])
    assert code == 0
    L = Layout.at(out)
    fp = read_json(L.fingerprint)
    assert fp["dims"] == dims and fp["task"] == task
    assert len(fp["shape"]) == dims + 1 and fp["shape"][0] == 1 and fp["channels"] == ["grey"]  # [C, *S]
    manifest = read_json(L.synthetic(0) / "manifest.json")
    synthetic = read_parquet([L.synthetic(0) / s for s in manifest["shards"]])
    assert synthetic.images.shape[1:] == tuple(fp["shape"])
    if task == "segmentation":
        # Every synthetic image comes with its mask, with labels from the real schema.
        assert synthetic.masks is not None and synthetic.masks.shape == synthetic.images.shape[:1] + synthetic.images.shape[2:]
        assert int(synthetic.masks.max()) < fp["num_mask_classes"]
    else:
        assert synthetic.masks is None
    if dims == 3:
        for sample in manifest["samples"]:
            img = nib.load(L.synthetic(0) / sample["path"])
            assert img.shape == tuple(fp["shape"][1:])  # one channel: a 3D file
            assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
            np.testing.assert_allclose(img.header.get_zooms(), fp["spacing"], rtol=1e-5)
            assert img.header["descrip"].item() in (b"", "")
            if task == "segmentation":
                seg = nib.load(L.synthetic(0) / sample["path"].replace(".nii.gz", "_seg.nii.gz"))
                assert seg.get_data_dtype() == np.uint8 and seg.shape == img.shape
        assert (L.report / "synthetic_volumes.png").is_file()
    rows = pq.read_table(L.study / "results.parquet").to_pylist()
    headline = "mean_dice" if task == "segmentation" else "balanced_accuracy"
    assert rows and all(headline in r and r[headline] is not None for r in rows)
    report = read_json(L.report / "report.json")
    assert headline in report["metrics"]
    # Robustness in every dims x task: each network on corrupted test parts and the shifted scanner.
    rb = report["robustness"]
    assert rb["primary"] == headline and rb["external_source"].startswith("builtin")
    corrupted = pq.read_table(L.robustness / "corrupted.parquet").to_pylist()
    assert len(corrupted) == len(rows) * len(rb["corruptions"]) * len(rb["severities"])
    assert all(r[headline] is not None for r in corrupted)
    assert (L.report / "severity_curves.png").is_file() and (L.report / "external_vs_internal.png").is_file()


def _rgb_folder(root, n_per_class=20, side=20):
    """Class folders of RGB PNGs whose three channels are different sequences (a disc bright in
    R, dark in G, mid in B for class ``lesion``), each with its mask beside it."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    for c, name in enumerate(["healthy", "lesion"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            base = rng.normal(0, 1, (side, side, 3))
            base[..., 0] += (yy + xx) / side  # the "anatomy" differs per channel
            base[..., 1] -= np.abs(yy - side / 2) / side
            mask = np.zeros((side, side), np.uint8)
            if c:
                cy, cx = rng.integers(6, side - 6, 2)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 16
                base[disc] += [3.0, -3.0, 1.5]
                mask[disc] = 255
            rgb = np.clip((base - base.min()) / (base.max() - base.min()) * 255, 0, 255).astype(np.uint8)
            Image.fromarray(rgb, "RGB").save(root / name / f"im{i:02d}.png")
            Image.fromarray(mask, "L").save(root / name / f"im{i:02d}_seg.png")


def test_three_channel_2d_pipeline(ray_session, tmp_path):
    """data.channels=rgb: prepare keeps (N, 3, S, S); generator, samples, study, quality and
    report all run on three channels with the mask generated alongside."""
    src = tmp_path / "rgb"
    _rgb_folder(src)
    out = tmp_path / "rgb-out"
    code = main(["pipeline", "--preset", "smoke", "--data", str(src), "--task", "segmentation", "--out", str(out), "-q",
                 "--set", "data.channels=rgb", *FAST])
    assert code == 0
    L = Layout.at(out)
    fp = read_json(L.fingerprint)
    assert fp["shape"] == [3, 16, 16] and fp["channels"] == ["red", "green", "blue"]
    records = read_parquet(L.data_parquet)
    assert records.images.shape == (40, 3, 16, 16) and records.masks.shape == (40, 16, 16)
    assert not np.allclose(records.images[:, 0], records.images[:, 1])  # the channels stay distinct
    assert read_json(L.ddpm(0) / "config.json")["num_channels"] == 3
    manifest = read_json(L.synthetic(0) / "manifest.json")
    synthetic = read_parquet([L.synthetic(0) / s for s in manifest["shards"]])
    assert synthetic.images.shape[1:] == (3, 16, 16) and synthetic.masks.shape[1:] == (16, 16)
    rows = pq.read_table(L.study / "results.parquet").to_pylist()
    assert rows and all(r["mean_dice"] is not None for r in rows)
    assert (L.report / "report.json").is_file()
