"""The latent path (diffusion.space=latent): MONAI AutoencoderKL per fold, diffusion on its scaled
latents, decoded samples. Unit cases are tables of small shapes; the pipeline cases run
prepare -> autoencoder -> train -> sample on a real local Ray, in 2D and in 3D."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from raysynth.artifacts import AUTOENCODER_META, Layout, read_autoencoder, read_json
from raysynth.cli import main
from raysynth.config import AutoencoderConfig, ConfigError, load_config
from raysynth.data.schema import read_parquet
from raysynth.diffusion.autoencoder import (
    AutoencoderFit,
    build_autoencoder,
    encode,
    kl_divergence,
    latent_side,
    load_autoencoder,
    save_autoencoder,
    scale_factor,
)
from raysynth.diffusion.channels import encode_joint
from raysynth.errors import StageError
from raysynth.quality.reconstruction import ms_ssim_scales, reconstruction_metrics

SMALL = AutoencoderConfig(channels=[8, 16], downsampling_factor=2, latent_channels=3, train_steps=4, batch_size=4)


@pytest.mark.parametrize("dims, channels, size", [(2, 1, 16), (2, 3, 16), (2, 4, 8), (3, 1, 16), (3, 6, 8)])
def test_autoencoder_shapes(dims, channels, size):
    model = build_autoencoder(SMALL, dims=dims, in_channels=channels)
    x = torch.rand((2, channels) + (size,) * dims) * 2 - 1
    recon, mu, sigma = model(x)
    side = latent_side(size, SMALL)
    assert recon.shape == x.shape
    assert mu.shape == sigma.shape == (2, SMALL.latent_channels) + (side,) * dims
    assert encode(model, x, batch_size=1).shape == mu.shape


def test_fit_lowers_the_loss_and_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 2:6, 2:6] = 1.0  # one square: learnable in a few steps
    fit = AutoencoderFit(SMALL.replace(learning_rate=3e-3), dims=2, in_channels=1)
    g = torch.Generator().manual_seed(0)
    losses = [fit.step(x, None, generator=g) for _ in range(25)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    fit.export(tmp_path / "ae")
    loaded = load_autoencoder(tmp_path / "ae")
    torch.testing.assert_close(encode(loaded, x), encode(fit.model.eval(), x))
    state = fit.state_dict(25)
    again = AutoencoderFit(SMALL.replace(learning_rate=3e-3), dims=2, in_channels=1)
    assert again.load_state_dict(state) == 25


@pytest.mark.parametrize("bf16", [False, True])
def test_adversarial_loss_trains_a_discriminator(bf16):
    cfg = SMALL.replace(adversarial_weight=0.1, train_steps=2)
    fit = AutoencoderFit(cfg, dims=2, in_channels=1, bf16=bf16)
    before = [p.detach().clone() for p in fit.discriminator.parameters()]
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    for _ in range(2):  # the discriminator joins at half the steps
        fit.step(x)
    assert any(not torch.equal(a, b) for a, b in zip(before, fit.discriminator.parameters()))
    assert "discriminator" in fit.state_dict(2)


def test_kl_and_scale_factor():
    mu, sigma = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert float(kl_divergence(mu, sigma)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_divergence(mu + 1, sigma)) == pytest.approx(0.5 * 48)
    z = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    assert float((z * scale_factor(z)).std()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="zero variance"):
        scale_factor(torch.ones(4, 4))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["diffusion.space=latent", "data.image_size=20", "autoencoder.channels=[8,8,8,8]",
          "autoencoder.downsampling_factor=8"], "data.image_size: 20 is not divisible by autoencoder.downsampling_factor 8"),
        (["diffusion.space=latent", "data.image_size=8"], "data.image_size: 8 is too small for the latent path"),
        (["autoencoder.downsampling_factor=8"], "autoencoder.downsampling_factor: 8 does not match channels"),
        (["autoencoder.channels=[32]"], "autoencoder.channels"),
        (["autoencoder.perceptual_weight=1"], "autoencoder.perceptual_weight: a perceptual loss needs pretrained weights"),
        (["diffusion.space=latent-ish"], "diffusion.space"),
    ],
)
def test_bad_latent_configs_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("side, scales", [(6, 0), (8, 1), (12, 1), (13, 2), (16, 2), (40, 3), (64, 4), (128, 5), (256, 5)])
def test_ms_ssim_scales_fit_the_side(side, scales):
    assert ms_ssim_scales(side) == scales


def test_reconstruction_metrics_of_a_faithful_and_a_poor_autoencoder():
    torch.manual_seed(0)
    cfg = SMALL.replace(learning_rate=3e-3, kl_weight=None)
    images = np.zeros((6, 2, 16, 16), np.float32) - 1
    images[:, :, 4:12, 4:12] = 1.0
    masks = (images[:, 0] > 0).astype(np.uint8)
    x = encode_joint(torch.from_numpy(images), torch.from_numpy(masks), 2)  # 2 image + 2 one-hot mask channels
    fit = AutoencoderFit(cfg, dims=2, in_channels=4)
    poor = reconstruction_metrics(fit.model.eval(), images, masks, 2)
    fit.model.train()
    for _ in range(60):
        fit.step(x)
    good = reconstruction_metrics(fit.model.eval(), images, masks, 2)
    assert good["psnr"] > poor["psnr"] and good["ssim"] > poor["ssim"] and good["l1"] < poor["l1"]
    assert 0 <= poor["mask_dice"] <= good["mask_dice"] <= 1


def test_save_and_load_keep_the_architecture(tmp_path):
    model = build_autoencoder(SMALL, dims=3, in_channels=2)
    save_autoencoder(model, SMALL, tmp_path, dims=3, in_channels=2)
    spec = json.loads((tmp_path / "autoencoder_config.json").read_text())
    assert spec["dims"] == 3 and spec["in_channels"] == 2 and spec["autoencoder"]["latent_channels"] == 3
    assert sum(p.numel() for p in load_autoencoder(tmp_path).parameters()) == sum(p.numel() for p in model.parameters())


# ---- the pipeline on Ray ----------------------------------------------------------------------------

LATENT = ["diffusion.space=latent", "autoencoder.channels=[16,32]", "autoencoder.downsampling_factor=2",
          "autoencoder.train_steps=6", "autoencoder.checkpoint_every=6", "autoencoder.batch_size=8",
          "diffusion.train_steps=6", "diffusion.checkpoint_every=6"]


@pytest.mark.slow
@pytest.mark.parametrize("dims, task", [(2, "classification"), (3, "segmentation")])
def test_latent_pipeline_trains_per_fold_and_decodes_samples(ray_session, tmp_path, dims, task):
    out = str(tmp_path / f"latent{dims}")
    overrides = [f"data.dims={dims}", f"data.task={task}", *LATENT]
    if dims == 3:
        overrides += ["data.num_scans=16", "sampling.ratio=0.25"]
    cfg = load_config("smoke", None, overrides)
    args = ["--preset", "smoke", "-q", *(w for o in overrides for w in ("--set", o))]
    for stage in ("prepare", "autoencoder", "train", "sample", "quality"):
        assert main([stage, "--out", out, *args]) == 0, stage
    L = Layout.at(out)
    fp = read_json(L.fingerprint)
    splits = read_json(L.splits)["folds"]
    for fold in splits:
        k = fold["fold"]
        ae = read_autoencoder(L, cfg, k)
        ids = read_json(L.autoencoder(k) / "train_ids.json")
        # No leakage: the autoencoder saw the fold's training part only, the same ids as its generator.
        assert set(ids["train_ids"]).isdisjoint(fold["test"]) and ids["test_ids"] == fold["test"]
        assert ids["train_ids"] == read_json(L.ddpm(k) / "train_ids.json")["train_ids"]
        assert ae["latent_shape"] == [4] + [16 // 2] * dims and ae["scale_factor"] > 0
        meta = read_json(L.ddpm(k) / "config.json")
        assert meta["space"] == "latent" and meta["autoencoder"]["digest"] == ae["digest"]
        manifest = read_json(L.synthetic(k) / "manifest.json")
        data = read_parquet([L.synthetic(k) / s for s in manifest["shards"]])
        assert len(data) == manifest["num_samples"] > 0
        assert data.images.shape[1:] == tuple(fp["shape"])  # decoded back to the image space
        assert np.isfinite(data.images).all() and data.images.min() >= -1 and data.images.max() <= 1
        if task == "segmentation":
            assert data.masks.shape == (len(data),) + (16,) * dims and int(data.masks.max()) < fp["num_mask_classes"]
    recon = read_json(L.quality / "quality.json")["reconstruction"]  # the autoencoders on each real test part
    assert [r["fold"] for r in recon] == [f["fold"] for f in splits]
    for r in recon:
        assert r["n"] == len(splits[r["fold"]]["test"]) and np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
        assert r["ms_ssim_scales"] == 2 and -1 <= r["ms_ssim"] <= 1  # 16 px: two MS-SSIM scales fit
        assert (task == "segmentation") == ("mask_dice" in r)
    if dims == 3:
        nifti = sorted((L.synthetic(0) / "nifti").glob("*.nii.gz"))
        assert nifti, "3D samples are written as NIfTI"

    # An autoencoder of another fold given to fold 0's diffusion stage is refused in one line.
    shutil.rmtree(L.autoencoder(0))
    shutil.copytree(L.autoencoder(1), L.autoencoder(0))
    with pytest.raises(StageError, match="belongs to fold 1, not fold 0"):
        read_autoencoder(L, cfg, 0)
    assert main(["train", "--out", out, "--force", *args]) == 2
    # ... and so is one trained with another config.
    other = load_config("smoke", None, [*overrides, "autoencoder.kl_weight=0.001"])
    with pytest.raises(StageError, match="another data/cv/autoencoder config"):
        read_autoencoder(L, other, 1)
    meta = read_json(L.autoencoder(1) / AUTOENCODER_META)
    assert meta["fold"] == 1 and meta["disjoint"] is True
