"""Class-conditional denoisers for 2D images and 3D volumes behind one interface.

2D uses diffusers' ``UNet2DModel``, 3D uses MONAI's ``DiffusionModelUNet(spatial_dims=3)``: both take
float timesteps, so the same network serves DDPM (integer steps) and the gamma process (EDM's
``c_noise``). ``Denoiser`` is a diffusers ``ModelMixin``/``ConfigMixin``: every constructor argument is in
``Denoiser.config``, and ``save_pretrained``/``from_pretrained`` write and read diffusers' folder
layout (``config.json`` + ``diffusion_pytorch_model.safetensors``), local folders only.

MONAI is imported only when a 3D denoiser is built: a 2D sampler actor starts faster and smaller
without it (issue 9: about 1 s and 116 MB per process).
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from raysynth.config import DiffusionConfig

WEIGHTS_NAME = SAFETENSORS_WEIGHTS_NAME
"""What ``save_pretrained`` writes next to ``config.json``: diffusers' ``diffusion_pytorch_model.safetensors``."""
LEGACY_WEIGHTS_NAME = "model.safetensors"
"""The weights file of folders saved before the Denoiser was a ``ModelMixin``; ``from_pretrained`` still reads it."""
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


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_modeling_logger = logging.getLogger("diffusers.models.modeling_utils")


def __getattr__(name: str) -> Any:
    # PEP 562: resolves the lazily made class for pickle (and for anyone importing it by name).
    if name == "_CheckpointedResnetBlock":
        return _checkpointed_block_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Denoiser(ModelMixin, ConfigMixin):
    """A class-conditional UNet: ``forward(x (B,C,*S), t (B,), class_labels (B,)) -> (B,C,*S)``.

    ``t`` is whatever the noise process conditions on: integer DDPM steps or float ``c_noise``.
    Spatial sides must be divisible by ``2 ** (len(channels) - 1)`` (one halving per extra level).

    Attention: 2D puts ``AttnDownBlock2D``/``AttnUpBlock2D`` and a middle attention only at the lowest
    resolution when ``attention`` is set. MONAI's 3D middle block always has self-attention (it cannot
    be turned off in 1.6); ``attention`` adds it to the lowest level's down/up blocks as well.

    ``null_class`` adds one class embedding past the real ones, ``null_label = num_classes``, that
    stands for "no label": classifier-free guidance trains on it (``diffusion.class_dropout``) and
    samples with it. Checkpoints saved before it existed load without one.

    ``gradient_checkpointing`` does not change the weights (same state-dict keys); it is in the config
    like every other argument, and ``enable_gradient_checkpointing``/``disable_gradient_checkpointing``
    switch it (and the config) afterwards.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
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
        null_class: bool = False,
    ) -> None:
        super().__init__()
        channels = _validate(dims, in_channels, image_size, num_classes, channels, layers_per_block)
        normalised = {
            "dims": int(dims),
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "num_classes": int(num_classes),
            "channels": channels,
            "layers_per_block": int(layers_per_block),
            "attention": bool(attention),
            "gradient_checkpointing": bool(gradient_checkpointing),
            "null_class": bool(null_class),
        }
        # register_to_config stored the arguments as passed (a tuple, numpy ints) plus diffusers'
        # ``_use_default_values``, which lists positional arguments too and would make
        # ``from_config(model.config)`` drop them; keep JSON-plain values and no such marker.
        hidden = {k: v for k, v in self._internal_dict.items() if k.startswith("_") and k != "_use_default_values"}
        self._internal_dict = FrozenDict({**hidden, **normalised})
        self._dims = normalised["dims"]
        self._in_channels = normalised["in_channels"]
        self._divisor = 2 ** (len(channels) - 1)
        self.null_label: Optional[int] = int(num_classes) if null_class else None
        embeddings = int(num_classes) + (1 if null_class else 0)

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
                num_class_embeds=embeddings,
            )
        else:
            from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

            self.unet = DiffusionModelUNet(
                spatial_dims=3,
                in_channels=in_channels,
                out_channels=in_channels,
                num_res_blocks=layers_per_block,
                channels=tuple(channels),
                attention_levels=tuple(attention and i == levels - 1 for i in range(levels)),
                norm_num_groups=groups,
                num_head_channels=tuple(_head_dim(c) for c in channels),
                num_class_embeds=embeddings,
                # PyTorch's scaled_dot_product_attention: memory-efficient on GPU, also runs on CPU.
                use_flash_attention=True,
            )
        if gradient_checkpointing:
            self._set_checkpointing(True)

    @property
    def dims(self) -> int:
        return self._dims

    # ---- gradient checkpointing ------------------------------------------------------------------

    def _set_checkpointing(self, enable: bool, func: Callable | None = None) -> None:
        if self._dims == 2:
            if enable:
                # A module-level function rather than diffusers' default closure, so the model still pickles.
                self.unet.enable_gradient_checkpointing(func or _checkpoint_call)
            else:
                self.unet.disable_gradient_checkpointing()
        else:
            from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

            plain, checked = DiffusionUNetResnetBlock, _checkpointed_block_class()
            old, new = (plain, checked) if enable else (checked, plain)
            for module in self.unet.modules():
                if type(module) is old:
                    module.__class__ = new

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable | None = None) -> None:
        """Recompute activations in backward (2D: diffusers' blocks; 3D: MONAI's resnet blocks)."""
        self._set_checkpointing(True, gradient_checkpointing_func)
        self.register_to_config(gradient_checkpointing=True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_checkpointing(False)
        self.register_to_config(gradient_checkpointing=False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        if self._dims == 2:
            return self.unet.is_gradient_checkpointing
        return any(type(m).__name__ == "_CheckpointedResnetBlock" for m in self.unet.modules())

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *S) float; t: (B,) or scalar, int or float; class_labels: (B,) long -> (B, C, *S)."""
        batch = x.shape[0]
        if x.ndim != 2 + self._dims or x.shape[1] != self._in_channels:
            raise ValueError(
                f"Denoiser: x has shape {tuple(x.shape)}; expected (B, {self._in_channels}, "
                f"{', '.join(['S'] * self._dims)})"
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
        if self._dims == 2:
            out = self.unet(x, t, class_labels=class_labels).sample
        else:
            out = self.unet(x, timesteps=t, class_labels=class_labels)
        # Under autocast the UNet returns bf16/fp16; schedulers and losses expect the input's dtype.
        return out.to(x.dtype)

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        map_location: str | torch.device | None = "cpu",
        **kwargs: Any,
    ) -> "Denoiser":
        """Rebuild a ``save_pretrained`` folder (a local directory; the Hub is never asked) on ``map_location``.

        ``kwargs`` go to diffusers' ``ModelMixin.from_pretrained``; constructor arguments among them
        (e.g. ``gradient_checkpointing=True``) override the saved config. Weights that do not match the
        model the config builds (missing, unexpected or differently shaped keys) raise ``RuntimeError``
        instead of diffusers' warning and a partly initialised model. The model comes back in eval mode.
        """
        directory = Path(pretrained_model_name_or_path, kwargs.pop("subfolder", None) or "")
        if not (directory / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"Denoiser.from_pretrained: {directory / CONFIG_NAME} is missing")
        config = json.loads((directory / CONFIG_NAME).read_text())
        saved_class = config.get("_class_name", cls.__name__)
        if saved_class != cls.__name__:
            raise ValueError(
                f"Denoiser.from_pretrained: {directory} holds a {saved_class!r}, not a {cls.__name__!r}"
            )
        weights = [f for f in os.listdir(directory) if f.startswith("diffusion_pytorch_model")]
        want_info = kwargs.pop("output_loading_info", False)
        overrides = sorted(kwargs)
        if weights:
            kwargs.setdefault("low_cpu_mem_usage", False)  # no accelerate needed, no meta tensors, no warning
            kwargs["local_files_only"] = True
            # diffusers only logs unfitting weights ("newly initialized ... you should probably TRAIN"):
            # drop those lines, they become the error below.
            quiet = _DropRecords("Some weights of")
            _modeling_logger.addFilter(quiet)
            try:
                model, info = super().from_pretrained(str(directory), output_loading_info=True, **kwargs)
            finally:
                _modeling_logger.removeFilter(quiet)
        elif (directory / LEGACY_WEIGHTS_NAME).is_file():
            model, info = cls._from_legacy_folder(directory, config, **kwargs)
        else:
            raise FileNotFoundError(f"Denoiser.from_pretrained: {directory / WEIGHTS_NAME} is missing")
        problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
        if problems:
            raise RuntimeError(
                f"Denoiser.from_pretrained: the weights in {directory} do not fit the model that its config"
                + (f" with overrides {overrides}" if overrides else "") + " builds: "
                + "; ".join(f"{len(v)} {k} (first: {sorted(map(str, v))[:5]})" for k, v in problems.items())
            )
        if map_location is not None:
            model = model.to(map_location)
        return (model, info) if want_info else model

    @classmethod
    def _from_legacy_folder(cls, directory: Path, config: dict, **kwargs: Any) -> tuple["Denoiser", dict]:
        # Saved by the hand-made save_pretrained: config.json of the weight-defining arguments, model.safetensors.
        model = cls.from_config(config, **kwargs)
        result = model.load_state_dict(load_file(str(directory / LEGACY_WEIGHTS_NAME)), strict=False)
        model.register_to_config(_name_or_path=str(directory))
        model.eval()
        return model, {"missing_keys": result.missing_keys, "unexpected_keys": result.unexpected_keys}


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
        null_class=cfg.class_dropout > 0,
    )


def _validate(
    dims: Any, in_channels: Any, image_size: Any, num_classes: Any, channels: Any, layers: Any
) -> list[int]:
    """Raise ``ValueError`` naming the first bad argument; return ``channels`` as a list of ints."""
    original = channels
    for name, value in (("dims", dims), ("in_channels", in_channels), ("image_size", image_size),
                        ("num_classes", num_classes), ("layers_per_block", layers)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"Denoiser: {name}={value!r} must be an integer")
    if dims not in (2, 3):
        raise ValueError(f"Denoiser: dims={dims!r} is not supported; choose one of [2, 3]")
    if in_channels < 1:
        raise ValueError(f"Denoiser: in_channels={in_channels} must be >= 1")
    if num_classes < 1:
        raise ValueError(f"Denoiser: num_classes={num_classes} must be >= 1")
    try:
        channels = list(channels) if not isinstance(channels, (str, bytes)) else None
    except TypeError:
        channels = None
    if channels is None:
        raise ValueError(f"Denoiser: channels={original!r} must be a list of widths")
    if not channels or any(not isinstance(c, numbers.Integral) or isinstance(c, bool) or c < 1 for c in channels):
        raise ValueError(f"Denoiser: channels={channels} must be a non-empty list of positive integer widths")
    if layers < 1:
        raise ValueError(f"Denoiser: layers_per_block={layers} must be >= 1")
    divisor = 2 ** (len(channels) - 1)
    if image_size < 1 or image_size % divisor:
        raise ValueError(
            f"Denoiser: image_size={image_size} must be a positive multiple of {divisor} "
            f"(2 ** (len(channels) - 1) for channels={channels})"
        )
    return [int(c) for c in channels]
