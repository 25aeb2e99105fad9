"""The latent path's autoencoder: MONAI's ``AutoencoderKL`` in 2D and 3D, its fit, and latents.

Latent diffusion (Rombach et al. 2022; Pinaya et al. 2022 for brain MRI; MAISI) runs the noise
process on ``z = scale * E(x)`` instead of on ``x``: a ``downsampling_factor`` f shrinks every
side f times, so a step of the denoiser costs about f**dims times less. The autoencoder sees the
same joint tensor as a pixel generator (image channels, then the one-hot mask in [-1, 1] for
segmentation, :mod:`raysynth.diffusion.channels`), so a decoded sample carries its mask with it.

Losses (numbered as in :meth:`AutoencoderFit.step`):

1. reconstruction: L1 between ``x`` and ``D(z)``, every channel;
2. KL: ``0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)`` per sample (Kingma & Welling 2014, App. B),
   weighted by ``kl_weight``;
3. adversarial (optional): least-squares patch-GAN (MONAI ``PatchDiscriminator`` and
   ``PatchAdversarialLoss``), from half the steps on, weighted by ``adversarial_weight``.

No perceptual loss: its networks need pretrained weights that cannot be fetched here.

The latents are the posterior means ``mu`` (deterministic, so a fold's training latents are a
fixed data set) scaled to unit variance by ``scale_factor = 1 / std(mu)`` over the fold's training
images, which is what MONAI's ``LatentDiffusionInferer`` expects and what the noise processes'
unit-scale schedules assume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from raysynth.config import AutoencoderConfig, section_from_dict
from raysynth.diffusion.networks import norm_groups

WEIGHTS = "autoencoder.safetensors"
CONFIG = "autoencoder_config.json"
"""The two files of an exported autoencoder: weights, and what rebuilds the network."""


def build_autoencoder(cfg: AutoencoderConfig, *, dims: int, in_channels: int) -> torch.nn.Module:
    """MONAI ``AutoencoderKL`` for ``in_channels``-channel inputs of ``dims`` spatial dimensions."""
    from monai.networks.nets import AutoencoderKL

    if dims not in (2, 3):
        raise ValueError(f"build_autoencoder: dims={dims!r} is not supported; choose one of [2, 3]")
    if in_channels < 1:
        raise ValueError(f"build_autoencoder: in_channels={in_channels} must be >= 1")
    levels = len(cfg.channels)
    return AutoencoderKL(
        spatial_dims=dims,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(cfg.channels),
        num_res_blocks=(cfg.num_res_blocks,) * levels,
        attention_levels=tuple(cfg.attention and i == levels - 1 for i in range(levels)),
        latent_channels=cfg.latent_channels,
        norm_num_groups=norm_groups(cfg.channels),
        with_encoder_nonlocal_attn=cfg.attention,
        with_decoder_nonlocal_attn=cfg.attention,
        include_fc=False,
    )


def latent_side(image_size: int, cfg: AutoencoderConfig) -> int:
    """Side of the latent of an ``image_size``-sided input."""
    if image_size % cfg.downsampling_factor:
        raise ValueError(f"image_size {image_size} is not divisible by downsampling_factor {cfg.downsampling_factor}")
    return image_size // cfg.downsampling_factor


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)), summed over a sample's latent, averaged over the batch."""
    dims = tuple(range(1, z_mu.ndim))
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1.0).sum(dim=dims)
    return kl.mean()


class AutoencoderFit:
    """One autoencoder's training state: network, optional discriminator, their optimisers.

    Has the interface of :class:`raysynth.diffusion.trainer.GeneratorFit` that the Ray Train loop
    (:func:`raysynth.diffusion.worker.fit_loop`) needs: ``step``, ``state_dict``,
    ``load_state_dict``, ``export`` and ``EXPORT``."""

    EXPORT = "autoencoder"
    """The folder of a checkpoint that holds the exported network."""

    def __init__(self, cfg: AutoencoderConfig, *, dims: int, in_channels: int, device: torch.device | str = "cpu",
                 bf16: Optional[bool] = None) -> None:
        self.cfg, self.dims, self.in_channels = cfg, dims, in_channels
        self.device = torch.device(device)
        # bf16 autocast of the forward passes: on GPU by default; on CPU when asked (the generator's
        # diffusion.cpu_bf16, which pays only where the CPU has AVX512-BF16 or AMX). Losses in fp32.
        self.bf16 = self.device.type == "cuda" if bf16 is None else bf16
        self.model = build_autoencoder(cfg, dims=dims, in_channels=in_channels).to(self.device)
        self.trained = self.model  # what the step calls: the model itself, or its DDP wrapper
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate)
        self.discriminator = self.trained_disc = None
        if cfg.adversarial_weight:
            from monai.losses import PatchAdversarialLoss
            from monai.networks.nets import PatchDiscriminator

            self.discriminator = PatchDiscriminator(spatial_dims=dims, channels=32, in_channels=in_channels,
                                                    num_layers_d=2).to(self.device)
            self.trained_disc = self.discriminator
            self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.learning_rate)
            self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.step_count = 0

    @property
    def raw_model(self) -> torch.nn.Module:
        return self.trained.module if hasattr(self.trained, "module") else self.trained

    def step(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None) -> float:
        """One optimiser step on ``x (B, C, *S)``; returns the generator-side loss. ``labels`` is
        accepted for the shared loop (the autoencoder is unconditional). MONAI draws the posterior
        sample from the global generator: it is seeded from ``generator``, so a resumed fit sees
        the draws an uninterrupted one would have seen."""
        c = self.cfg
        # 1-2. Reconstruction and KL (Kingma & Welling 2014, Eq. 10 and App. B).
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            with self._autocast():
                recon, z_mu, z_sigma = self.trained(x)
        loss = torch.nn.functional.l1_loss(recon.float(), x)
        if c.kl_weight:
            loss = loss + c.kl_weight * kl_divergence(z_mu.float(), z_sigma.float())
        # 3. Adversarial, from half the steps on: the decoder first learns to reconstruct.
        adversarial_on = self.discriminator is not None and self.step_count >= c.train_steps // 2
        if adversarial_on:
            with self._autocast():
                fake = self.trained_disc(recon.contiguous())[-1].float()
            loss = loss + c.adversarial_weight * self.adversarial(fake, target_is_real=True, for_discriminator=False)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if adversarial_on:
            with self._autocast():
                real = self.trained_disc(x.contiguous())[-1].float()
                fake = self.trained_disc(recon.detach().contiguous())[-1].float()
            d_loss = 0.5 * (self.adversarial(fake, target_is_real=False, for_discriminator=True)
                            + self.adversarial(real, target_is_real=True, for_discriminator=True))
            self.d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            self.d_optimizer.step()
        self.step_count += 1
        return float(loss.detach())

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def state_dict(self, step: int) -> dict:
        state = {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}
        if self.discriminator is not None:
            disc = self.trained_disc.module if hasattr(self.trained_disc, "module") else self.trained_disc
            state.update(discriminator=disc.state_dict(), d_optimizer=self.d_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict) -> int:
        """Restore the networks and optimisers; returns the step to continue from."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.step_count = int(state["step"])
        return self.step_count

    def export(self, path: str | Path) -> None:
        save_autoencoder(self.raw_model, self.cfg, path, dims=self.dims, in_channels=self.in_channels)


def save_autoencoder(model: torch.nn.Module, cfg: AutoencoderConfig, path: str | Path, *, dims: int,
                     in_channels: int) -> None:
    """Write ``path/autoencoder.safetensors`` and ``path/autoencoder_config.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps({"autoencoder": cfg.to_dict(), "dims": dims, "in_channels": in_channels}))


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The network that :func:`save_autoencoder` wrote, in eval mode on ``device``."""
    from safetensors.torch import load_file

    path = Path(path)
    spec = json.loads((path / CONFIG).read_text())
    cfg = section_from_dict(AutoencoderConfig, spec["autoencoder"], "autoencoder")
    model = build_autoencoder(cfg, dims=int(spec["dims"]), in_channels=int(spec["in_channels"]))
    model.load_state_dict(load_file(str(path / WEIGHTS), device="cpu"))
    return model.to(device).eval()


@torch.no_grad()
def encode(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Posterior means ``(N, L, *S/f)`` of ``x (N, C, *S)``, in batches (unscaled)."""
    device = next(model.parameters()).device
    out = [model.encode(x[i:i + batch_size].to(device))[0].float().cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def decode(model: torch.nn.Module, z: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``D(z)`` for unscaled latents ``z (B, L, *s)``, clipped to the data range [-1, 1], in chunks
    of ``batch_size``: a decoder's last upsampling of a whole GPU sampling batch at 256^2 can pass
    the 2**31 elements that some CUDA kernels index with int32."""
    device = next(model.parameters()).device
    out = [model.decode(z[i:i + batch_size].to(device)).float().clamp(-1.0, 1.0) for i in range(0, z.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def scale_factor(latents: torch.Tensor) -> float:
    """``1 / std`` of a fold's training latents, so the process sees unit-variance data."""
    std = float(latents.float().std())
    if not std > 0:
        raise ValueError("scale_factor: the training latents have zero variance (the autoencoder collapsed)")
    return 1.0 / std
