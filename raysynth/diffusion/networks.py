"""Class-conditional denoisers for 2D images and 3D volumes behind one interface.

2D uses diffusers' ``UNet2DModel``, 3D uses MONAI's ``DiffusionModelUNet(spatial_dims=3)``: both take
float timesteps, so the same network serves DDPM (integer steps) and the gamma process (EDM's
``c_noise``). The constructor arguments are the saved config, as in diffusers.

MONAI is imported only when a 3D denoiser is built: a 2D sampler actor starts faster and smaller
without it (issue 9: about 1 s and 116 MB per process).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from raysynth.config import DiffusionConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_GROUP_CHOICES = (32, 16, 8, 4, 2, 1)
_HEAD_DIM = 8


def norm_groups(channels: Sequence[int]) -> int:
    """The largest GroupNorm group count in (32, 16, ..., 1) that divides every width."""
    return next(g for g in _GROUP_CHOICES if all(c % g == 0 for c in channels))


def _head_dim(width: int) -> int:
    # Heads of 8 channels as in both libraries' defaults; a width that 8 does not divide gets one head.
    return _HEAD_DIM if width % _HEAD_DIM == 0 else width


def _checkpoint_call(module: torch.nn.Module, *args: Any) -> Any:
    return checkpoint(module.__call__, *args, use_reentrant=False)


@functools.cache
def _checkpointed_block_class() -> type:
    """MONAI's resnet block, recomputed in backward instead of keeping its activations.

    MONAI 1.6's ``DiffusionModelUNet`` has no gradient checkpointing. Swapping the class of each
    resnet block (where most activation memory sits) keeps the state-dict keys unchanged, survives
    ``copy.deepcopy`` (EMA copies) and pickles by reference, unlike a per-instance ``forward``.
    The class is made on first use, so importing this module does not import MONAI; the module's
    ``__getattr__`` serves it as ``_CheckpointedResnetBlock``, which is where pickle looks it up.
    """
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    class _CheckpointedResnetBlock(DiffusionUNetResnetBlock):
        def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            if self.training and torch.is_grad_enabled():
                return checkpoint(super().forward, x, emb, use_reentrant=False)
            return super().forward(x, emb)

    _CheckpointedResnetBlock.__module__ = __name__
    _CheckpointedResnetBlock.__qualname__ = "_CheckpointedResnetBlock"
    return _CheckpointedResnetBlock


def __getattr__(name: str) -> Any:
    # PEP 562: resolves the lazily made class for pickle (and for anyone importing it by name).
    if name == "_CheckpointedResnetBlock":
        return _checkpointed_block_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Denoiser(torch.nn.Module):
    """A class-conditional UNet: ``forward(x (B,C,*S), t (B,), class_labels (B,)) -> (B,C,*S)``.

    ``t`` is whatever the noise process conditions on: integer DDPM steps or float ``c_noise``.
    Spatial sides must be divisible by ``2 ** (len(channels) - 1)`` (one halving per extra level).

    Attention: 2D puts ``AttnDownBlock2D``/``AttnUpBlock2D`` and a middle attention only at the lowest
    resolution when ``attention`` is set. MONAI's 3D middle block always has self-attention (it cannot
    be turned off in 1.6); ``attention`` adds it to the lowest level's down/up blocks as well.
    """

    def __init__(
        self,
        dims: int,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: Sequence[int] = (32, 64, 64),
        layers_per_block: int = 1,
        attention: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        _validate(dims, in_channels, image_size, num_classes, channels, layers_per_block)
        # Only what defines the weights is config; checkpointing is a training-time choice.
        self.config: dict[str, Any] = {
            "dims": int(dims),
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "num_classes": int(num_classes),
            "channels": channels,
            "layers_per_block": int(layers_per_block),
            "attention": bool(attention),
        }
        groups = norm_groups(channels)
        levels = len(channels)
        if dims == 2:
            bottom = levels - 1
            self.unet = UNet2DModel(
                sample_size=image_size,
                in_channels=in_channels,
                out_channels=in_channels,
                down_block_types=tuple(
                    "AttnDownBlock2D" if attention and i == bottom else "DownBlock2D" for i in range(levels)
                ),
                up_block_types=tuple(
                    "AttnUpBlock2D" if attention and i == 0 else "UpBlock2D" for i in range(levels)
                ),
                block_out_channels=tuple(channels),
                layers_per_block=layers_per_block,
                norm_num_groups=groups,
                attention_head_dim=_head_dim(channels[-1]),
                add_attention=attention,
                num_class_embeds=num_classes,
            )
            if gradient_checkpointing:
                # A module-level function rather than diffusers' default closure, so the model still pickles.
                self.unet.enable_gradient_checkpointing(_checkpoint_call)
        else:
            from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet, DiffusionUNetResnetBlock

            self.unet = DiffusionModelUNet(
                spatial_dims=3,
                in_channels=in_channels,
                out_channels=in_channels,
                num_res_blocks=layers_per_block,
                channels=tuple(channels),
                attention_levels=tuple(attention and i == levels - 1 for i in range(levels)),
                norm_num_groups=groups,
                num_head_channels=tuple(_head_dim(c) for c in channels),
                num_class_embeds=num_classes,
                # PyTorch's scaled_dot_product_attention: memory-efficient on GPU, also runs on CPU.
                use_flash_attention=True,
            )
            if gradient_checkpointing:
                for module in self.unet.modules():
                    if type(module) is DiffusionUNetResnetBlock:
                        module.__class__ = _checkpointed_block_class()
        self._divisor = 2 ** (levels - 1)

    @property
    def dims(self) -> int:
        return self.config["dims"]

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *S) float; t: (B,) or scalar, int or float; class_labels: (B,) long -> (B, C, *S)."""
        batch = x.shape[0]
        if x.ndim != 2 + self.dims or x.shape[1] != self.config["in_channels"]:
            raise ValueError(
                f"Denoiser: x has shape {tuple(x.shape)}; expected (B, {self.config['in_channels']}, "
                f"{', '.join(['S'] * self.dims)})"
            )
        if any(s % self._divisor for s in x.shape[2:]):
            raise ValueError(f"Denoiser: spatial shape {tuple(x.shape[2:])} must be divisible by {self._divisor}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,) or class_labels.shape != (batch,):
            raise ValueError(
                f"Denoiser: t {tuple(t.shape)} and class_labels {tuple(class_labels.shape)} must both be ({batch},)"
            )
        class_labels = class_labels.to(device=x.device, dtype=torch.long)
        if self.dims == 2:
            out = self.unet(x, t, class_labels=class_labels).sample
        else:
            out = self.unet(x, timesteps=t, class_labels=class_labels)
        # Under autocast the UNet returns bf16/fp16; schedulers and losses expect the input's dtype.
        return out.to(x.dtype)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True))
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu", **kwargs: Any
    ) -> "Denoiser":
        """Rebuild from ``save_pretrained`` output; ``kwargs`` (e.g. gradient_checkpointing) go to __init__."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"Denoiser.from_pretrained: {directory / name} is missing")
        model = cls(**json.loads((directory / CONFIG_NAME).read_text()), **kwargs)
        device = str(torch.device(map_location))
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME), device=device))
        return model.to(map_location)


def build_denoiser(cfg: DiffusionConfig, *, dims: int, in_channels: int, image_size: int, num_classes: int) -> Denoiser:
    """The denoiser that ``cfg`` describes, for ``in_channels`` channels of ``image_size``-sided inputs."""
    return Denoiser(
        dims=dims,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        attention=cfg.attention,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


def _validate(dims: int, in_channels: int, image_size: int, num_classes: int, channels: list[int], layers: int) -> None:
    if dims not in (2, 3):
        raise ValueError(f"Denoiser: dims={dims!r} is not supported; choose one of [2, 3]")
    if in_channels < 1:
        raise ValueError(f"Denoiser: in_channels={in_channels} must be >= 1")
    if num_classes < 1:
        raise ValueError(f"Denoiser: num_classes={num_classes} must be >= 1")
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"Denoiser: channels={channels} must be a non-empty list of positive widths")
    if layers < 1:
        raise ValueError(f"Denoiser: layers_per_block={layers} must be >= 1")
    divisor = 2 ** (len(channels) - 1)
    if image_size < 1 or image_size % divisor:
        raise ValueError(
            f"Denoiser: image_size={image_size} must be a positive multiple of {divisor} "
            f"(2 ** (len(channels) - 1) for channels={channels})"
        )
