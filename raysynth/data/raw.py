"""The raw inputs as loaded, before preprocessing: one :class:`RawScan` per image or volume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np


@dataclass
class RawScan:
    """One raw 2D image ``(C, H, W)`` or 3D volume ``(C, X, Y, Z)`` in scanner units (float32).

    The channel axis is always there (C = 1 for grey); all channels share one geometry."""

    id: str
    subject: str
    label: int
    image: np.ndarray
    mask: Optional[np.ndarray] = None
    """Integer label map of the spatial shape ``image.shape[1:]`` (uint8), or None."""
    spacing: tuple[float, ...] = ()
    affine: Optional[np.ndarray] = None
    """NIfTI 4x4 voxel-to-RAS affine after reorientation (3D only)."""
    source: Optional[str] = None
    """Path relative to ``data.source``. Kept for the fingerprint; never copied to outputs."""

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])


@dataclass
class RawSet:
    scans: list[RawScan]
    class_names: list[str]
    mask_names: Optional[list[str]]
    kind: str
    """``phantom``, ``phantom-shifted``, ``images`` or ``nifti``."""
    skipped: list[str] = field(default_factory=list)
    """Relative paths left out under ``bad_files="skip"``."""

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([s.label for s in self.scans], dtype=np.int64)


def grid_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A RAS affine for a volume of ``shape`` (D, H, W) with ``spacing`` mm, centred on the origin."""
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError(f"grid_affine: need 3D shape and spacing, got {tuple(shape)} and {tuple(spacing)}")
    affine = np.diag([float(s) for s in spacing] + [1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape, dtype=float) - 1.0) * np.asarray(spacing, dtype=float)
    return affine


RGB_NAMES = ["red", "green", "blue"]


def channel_names(channels, count: int = 0) -> list[str]:
    """The names of a record's channels for ``data.channels`` (``grey``, ``rgb`` or a suffix list):
    ``["grey"]``, ``["red", "green", "blue"]`` or the suffixes. ``count`` (if given) must match."""
    names = ["grey"] if channels == "grey" else list(RGB_NAMES) if channels == "rgb" else [str(c) for c in channels]
    if count and count != len(names):
        raise ValueError(f"channel_names: data.channels={channels!r} names {len(names)} channels, the records have {count}")
    return names
