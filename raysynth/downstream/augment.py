"""Classical MRI augmentation (training) and graded corruptions (test-time robustness), via MONAI.

Images travel as [-1, 1] tensors, but MRI intensity effects are physical on a non-negative
magnitude scale: a bias field multiplies the signal, Rician noise is the magnitude of complex
Gaussian noise, and background should pad as 0 signal. So both tools map to [0, 1], run the
MONAI transforms there, and map back with a clip to [-1, 1].

MONAI has no ghosting/motion transform (TorchIO has); ``RandKSpaceGhosting`` below follows
TorchIO's ghosting model (scale every n-th k-space plane) on MONAI's ``Fourier`` helpers.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from monai.transforms import (
    AdjustContrast,
    Compose,
    Fourier,
    GaussianSmooth,
    GibbsNoise,
    KSpaceSpikeNoise,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasField,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandomizableTransform,
    RandRicianNoise,
)
from monai.utils import convert_to_tensor


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x + 1.0) * 0.5


def _from_unit(x: torch.Tensor) -> torch.Tensor:
    return (x * 2.0 - 1.0).clamp_(-1.0, 1.0)


def _check_dims(dims: int) -> None:
    if dims not in (2, 3):
        raise ValueError(f"dims: {dims} is not supported; choose 2 or 3")


class ClassicalAugment:
    """Random flips, small affine, elastic (2D; 3D opt-in), bias field, Gaussian noise, gamma.

    Call with ``images`` ``(B, C, *S)`` in [-1, 1] (C channels, e.g. sequences) and, for
    segmentation, ``masks`` ``(B, *S)`` integer labels; returns ``(images, masks)`` of the same
    shapes, dtypes and device (``masks`` None when not given). Each sample draws its own
    parameters; all channels, image and mask share the spatial ones (mask resampled with nearest
    neighbour); the intensity transforms act on every channel. The random stream starts at ``seed``
    when built, so a fresh augmenter with the same seed replays the same sequence.
    """

    def __init__(self, dims: int, seed: int, segmentation: bool, elastic_3d: bool = False) -> None:
        _check_dims(dims)
        self.dims, self.segmentation = dims, segmentation
        keys = ["image", "mask"] if segmentation else ["image"]
        modes = ["bilinear", "nearest"] if segmentation else ["bilinear"]
        spatial = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(dims)]
        rotate = 0.26  # ~15 degrees about each axis
        spatial.append(RandAffined(
            keys, prob=0.5, rotate_range=rotate if dims == 2 else (rotate,) * 3, scale_range=0.1,
            translate_range=2.0, mode=modes, padding_mode="zeros",
        ))
        if dims == 2:
            spatial.append(Rand2DElasticd(
                keys, spacing=(8, 8), magnitude_range=(0.5, 1.5), prob=0.3, mode=modes, padding_mode="zeros",
            ))
        elif elastic_3d:
            # Off by default: a dense 3D displacement field costs ~0.9 s per 64^3 volume on one core.
            spatial.append(Rand3DElasticd(
                keys, sigma_range=(4.0, 6.0), magnitude_range=(1.0, 3.0), prob=0.2, mode=modes, padding_mode="zeros",
            ))
        intensity = [
            RandBiasFieldd("image", prob=0.3, coeff_range=(-0.2, 0.2)),
            RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
            RandGaussianNoised("image", prob=0.3, std=0.03),
        ]
        self.compose = Compose(spatial + intensity).set_random_state(seed)

    def __call__(
        self, images: torch.Tensor, masks: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if images.ndim != self.dims + 2 or images.shape[1] < 1:
            raise ValueError(f"images: expected (B, C, *S) with {self.dims} spatial axes, got {tuple(images.shape)}")
        if self.segmentation and masks is None:
            raise ValueError("masks: required by a segmentation augmenter")
        if masks is not None and masks.shape != images.shape[:1] + images.shape[2:]:
            raise ValueError(f"masks: expected shape {tuple(images.shape[:1] + images.shape[2:])}, got {tuple(masks.shape)}")
        device = images.device
        x = _to_unit(images.detach().float().cpu())
        out_x, out_m = [], []
        for i in range(x.shape[0]):
            item = {"image": x[i]}
            if masks is not None:
                item["mask"] = masks[i].detach().cpu()[None].float()
            item = self.compose(item)
            out_x.append(convert_to_tensor(item["image"], track_meta=False).float())
            if masks is not None:
                out_m.append(convert_to_tensor(item["mask"], track_meta=False)[0].round())
        new_x = _from_unit(torch.stack(out_x)).to(device=device, dtype=images.dtype)
        new_m = None if masks is None else torch.stack(out_m).to(device=device, dtype=masks.dtype)
        return new_x, new_m


def build_classical_augment(dims: int, seed: int, segmentation: bool, *, elastic_3d: bool = False) -> ClassicalAugment:
    """The "classical augmentation" arm's training-batch transform; see :class:`ClassicalAugment`."""
    return ClassicalAugment(dims, seed, segmentation, elastic_3d=elastic_3d)


class RandKSpaceGhosting(RandomizableTransform, Fourier):
    """Ghosting: scale every ``n``-th k-space plane along one axis by ``1 - intensity``.

    Periodic errors across phase-encoding lines put ``n`` faint copies of the object at a spacing
    of ``S / n`` (TorchIO ``RandomGhosting``). The central plane is restored so that the mean
    signal is kept. ``randomize`` draws the axis and ``n`` in ``num_ghosts``. Input ``(C, *S)``.
    """

    def __init__(self, intensity: float, num_ghosts: tuple[int, int] = (2, 5), prob: float = 1.0) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= intensity <= 1.0:
            raise ValueError(f"intensity: {intensity} must lie in [0, 1]")
        self.intensity, self.num_ghosts = intensity, num_ghosts
        self.axis, self.n = 0, num_ghosts[0]

    def randomize(self, spatial_dims: int) -> None:
        super().randomize(None)
        self.axis = int(self.R.randint(spatial_dims))
        self.n = int(self.R.randint(self.num_ghosts[0], self.num_ghosts[1] + 1))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        spatial_dims = img.ndim - 1
        if randomize:
            self.randomize(spatial_dims)
        if not self._do_transform:
            return img
        k = self.shift_fourier(img, spatial_dims)
        dim = 1 + self.axis
        centre = k.shape[dim] // 2
        keep = k.select(dim, centre).clone()
        index = [slice(None)] * k.ndim
        index[dim] = slice(None, None, self.n)
        k[tuple(index)] *= 1.0 - self.intensity
        k.select(dim, centre).copy_(keep)
        return self.inv_shift_fourier(k, spatial_dims)


class _RandKSpaceSpike(RandomizableTransform, Fourier):
    """One k-space spike of magnitude ``fraction * |DC|`` away from the centre (input ``(C, *S)``).

    Scaling by the DC term makes the stripe amplitude a fixed fraction of the mean signal, and
    keeping the spike off the centre 3x3(x3) stops it from replacing low frequencies, which
    would lower contrast instead of adding a herringbone pattern (MONAI's
    ``RandKSpaceSpikeNoise`` draws the location anywhere and the log-intensity in absolute units).
    """

    def __init__(self, fraction: float) -> None:
        RandomizableTransform.__init__(self, 1.0)
        self.fraction = fraction

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        spatial = img.shape[1:]
        if max(spatial) < 4:
            raise ValueError(f"spike: image of spatial shape {tuple(spatial)} has no k-space outside the centre")
        centre = np.array(spatial) // 2
        while True:
            loc = np.array([self.R.randint(s) for s in spatial])
            if np.abs(loc - centre).max() > 1:
                break
        dc = self.shift_fourier(img, len(spatial)).abs()[(slice(None), *centre)].max()
        log_intensity = float(torch.log(dc * self.fraction + 1e-10))
        return KSpaceSpikeNoise(tuple(int(v) for v in loc), log_intensity)(img)


# Severity schedules 1..5, on the [0, 1] magnitude scale. Published results depend on them:
# add a new corruption name rather than changing a row in place.
_SEVERITY: dict[str, tuple[float, ...]] = {
    "noise": (0.02, 0.04, 0.07, 0.10, 0.15),        # Rician sigma
    "bias": (0.1, 0.2, 0.3, 0.45, 0.6),              # Legendre coefficient range +-c
    "ghosting": (0.2, 0.35, 0.5, 0.7, 0.9),          # k-space plane attenuation
    "spike": (0.05, 0.1, 0.2, 0.35, 0.5),            # spike magnitude / DC magnitude
    "gibbs": (0.3, 0.4, 0.5, 0.6, 0.7),              # MONAI GibbsNoise alpha (k-space truncation)
    "blur": (0.5, 0.75, 1.0, 1.5, 2.0),              # Gaussian sigma in voxels
    "contrast": (1.3, 1.6, 2.0, 2.5, 3.0),           # gamma exponent
}
CORRUPTIONS = tuple(_SEVERITY)
_CHANNEL_WISE = ("gibbs", "blur")
"""Corruptions that are deterministic and act on each channel alone (safe to batch as channels)."""


def _corruption_transform(name: str, level: float) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "noise":
        return RandRicianNoise(prob=1.0, std=level, sample_std=False)
    if name == "bias":
        return RandBiasField(prob=1.0, coeff_range=(-level, level))
    if name == "ghosting":
        return RandKSpaceGhosting(intensity=level)
    if name == "spike":
        return _RandKSpaceSpike(fraction=level)
    if name == "gibbs":
        return GibbsNoise(alpha=level)
    if name == "blur":
        return GaussianSmooth(sigma=level)
    return AdjustContrast(gamma=level)


class Corruption:
    """A graded test-time corruption: ``corrupt(images)`` with ``images`` ``(N, C, *S)`` in [-1, 1],
    a numpy array or tensor; returns the same type, shape and dtype, clipped to [-1, 1]. Every
    channel of an image is corrupted (one draw per image, applied to its C channels together).

    The random stream restarts at ``seed`` on every call, so corrupting the same test set
    twice gives identical images; within a call each image gets its own draw.
    """

    def __init__(self, name: str, severity: int, seed: int, dims: int) -> None:
        if name not in _SEVERITY:
            raise ValueError(f"corruption {name!r} is not known; choose one of {list(CORRUPTIONS)}")
        if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
            raise ValueError(f"severity: {severity!r} must be an integer in 1..5")
        _check_dims(dims)
        self.name, self.severity, self.seed, self.dims = name, int(severity), int(seed), dims
        self.level = _SEVERITY[name][self.severity - 1]

    def __call__(self, images):
        if images.ndim != self.dims + 2:
            raise ValueError(f"images: expected (N, C, *S) with {self.dims} spatial axes, got shape {tuple(images.shape)}")
        is_numpy = isinstance(images, np.ndarray)
        x = torch.as_tensor(np.asarray(images) if is_numpy else images.detach().cpu()).float()
        transform = _corruption_transform(self.name, self.level)
        if isinstance(transform, RandomizableTransform):
            transform.set_random_state(self.seed)
        if self.name in _CHANNEL_WISE:
            # Deterministic and channel by channel: one call on the stack (images as channels)
            # gives the same images as one call per image, many times faster.
            flat = _to_unit(x).reshape((-1,) + tuple(x.shape[2:]))
            out = convert_to_tensor(transform(flat), track_meta=False).float().reshape(x.shape)
        else:
            out = torch.stack([
                convert_to_tensor(transform(_to_unit(img)), track_meta=False).float() for img in x
            ])
        out = _from_unit(out)
        if is_numpy:
            return out.numpy().astype(images.dtype, copy=False)
        return out.to(device=images.device, dtype=images.dtype)


def build_corruption(name: str, severity: int, seed: int, dims: int) -> Corruption:
    """Graded corruption ``name`` (one of :data:`CORRUPTIONS`) at ``severity`` 1..5."""
    return Corruption(name, severity, seed, dims)
