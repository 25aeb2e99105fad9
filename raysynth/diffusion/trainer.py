"""One generator's fit: denoiser, EMA, optimiser, noise process, and a single training step.

Shared by the Ray Train worker (``worker.py``) and the Ray Tune search trials (``tune_trial.py``), so
that a tuned configuration trains exactly as it was scored.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import torch
from diffusers.training_utils import EMAModel

from raysynth.config import DiffusionConfig
from raysynth.data.schema import ImageSet
from raysynth.diffusion.channels import encode_joint
from raysynth.diffusion.networks import build_denoiser
from raysynth.diffusion.process import build_process
from raysynth.runtime import use_cpu_bf16


def training_tensors(data: ImageSet, num_mask_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x0 (N, C, *S)`` in [-1, 1] (image, plus one-hot mask channels for segmentation) and labels ``(N,)``."""
    masks = torch.from_numpy(data.masks) if num_mask_classes else None
    x0 = encode_joint(torch.from_numpy(data.images), masks, num_mask_classes)
    labels = torch.from_numpy(data.labels).long()
    assert x0.shape[0] == labels.shape[0] and x0.ndim == data.dims + 2, x0.shape
    return x0, labels


def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``labels`` with each one replaced by ``null_label`` with probability ``p`` (Ho & Salimans 2022)."""
    gen_device = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape, generator=generator, device=gen_device).to(labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


class GeneratorFit:
    """Model, EMA weights, AdamW and the noise process of one generator."""

    EXPORT = "ema"
    """The folder of a checkpoint that holds the exported (EMA) denoiser, which the sampler loads."""

    def __init__(self, cfg: DiffusionConfig, *, dims: int, in_channels: int, image_size: int, num_classes: int,
                 device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.process = build_process(cfg)
        self.model = build_denoiser(cfg, dims=dims, in_channels=in_channels, image_size=image_size,
                                    num_classes=num_classes).to(self.device)
        # EMA warm-up (decay 1 - (1 + step)^(-2/3), capped at ema_decay) keeps short runs usable.
        self.ema = EMAModel(self.model.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
        self.ema.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.trained = self.model  # what the step calls: the model itself, or its DDP wrapper
        # bf16 autocast: always on GPU; on CPU only when asked (diffusion.cpu_bf16), since it pays
        # only where the CPU has bf16 instructions (AVX512-BF16, AMX) and moves the weights.
        self.bf16 = self.device.type == "cuda" or (self.device.type == "cpu" and use_cpu_bf16(cfg.cpu_bf16))

    @property
    def raw_model(self):
        return self.trained.module if hasattr(self.trained, "module") else self.trained

    def step(self, x0: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> float:
        """One optimiser step on a batch ``x0 (B, C, *S)``; returns the loss. bf16 autocast per ``self.bf16``.

        With ``class_dropout`` p > 0 each label is replaced by the null class with probability p."""
        if self.cfg.class_dropout > 0:
            labels = drop_labels(labels, self.cfg.class_dropout, self.raw_model.null_label, generator)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.process.training_loss(self.trained, x0, labels, generator=generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trained.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.ema.step(self.raw_model.parameters())
        return float(loss.detach())

    def state_dict(self, step: int) -> dict:
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "step": step}

    def load_state_dict(self, state: dict) -> int:
        """Restore model, optimiser and EMA; returns the step to continue from."""
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(self.device)
        return int(state["step"])

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[torch.nn.Module]:
        """Temporarily swap the EMA weights into the model (for sampling or saving)."""
        params = self.raw_model.parameters
        self.ema.store(params())
        self.ema.copy_to(params())
        try:
            yield self.raw_model
        finally:
            self.ema.restore(params())

    def export(self, path: str | Path) -> None:
        """The EMA denoiser, in diffusers' folder layout."""
        with self.ema_weights() as model:
            model.save_pretrained(path)
