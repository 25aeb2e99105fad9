"""A trained generator read back from its folder: the EMA denoiser, its noise process, its metadata,
and in latent space the autoencoder that decodes its samples."""

from __future__ import annotations

from typing import Optional

import torch

from raysynth.artifacts import CHECKPOINT_DIR, Layout, generator_meta
from raysynth.config import DiffusionConfig, section_from_dict
from raysynth.diffusion.networks import Denoiser
from raysynth.diffusion.process import build_process


def load_generator(layout: Layout, fold: int, device: str = "cpu", fraction: float = 1.0):
    """The trained EMA denoiser of a (fold, fraction), its noise process and its metadata."""
    folder = layout.ddpm(fold, fraction)
    meta = generator_meta(layout, fold, fraction)  # the driver checked its digest before sending us
    model = Denoiser.from_pretrained(folder / CHECKPOINT_DIR, map_location=device).to(device).eval()
    process = build_process(section_from_dict(DiffusionConfig, meta["diffusion"], "diffusion"))
    return model, process, meta


def load_decoder(layout: Layout, meta: dict, device: str = "cpu") -> Optional[torch.nn.Module]:
    """The autoencoder of a latent-space generator (its own fold's: train checked it), or None in
    pixel space. Found through the layout, so an output moved or staged elsewhere still loads."""
    if meta.get("space", "pixel") != "latent":
        return None
    from raysynth.diffusion.autoencoder import load_autoencoder

    ae = meta["autoencoder"]
    return load_autoencoder(layout.autoencoder(int(ae["fold"]), float(ae["fraction"])) / CHECKPOINT_DIR, device=device)
