"""A trained generator read back from its folder: the EMA denoiser, its noise process and its metadata."""

from __future__ import annotations

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
