"""Writing synthetic volumes as NIfTI files that standard viewers open, with no source identifiers.

Layout: one file per sample. A one-channel image is a 3D file ``(x, y, z)``; a multi-channel
image ``(C, x, y, z)`` (e.g. T1, FLAIR, T1c) is one 4D file with the channels last, ``(x, y, z, c)``,
in the order of ``fingerprint.json``'s ``channels`` (the 4th axis of one grid;
``nib.load(f).dataobj[..., k]`` is channel k). Masks are 3D label maps ``x_seg.nii.gz``.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from raysynth.data.raw import grid_affine
from raysynth.io import atomic_path

# NIfTI codes: 1 = scanner anatomical, 2 = aligned anatomical. Synthetic volumes live in the
# preprocessing grid (canonical RAS, isotropic), which is an aligned space, not a scanner's.
ALIGNED_ANAT = 2


def _scrubbed(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """Blank every free-text header field, so nothing from any input can ride along."""
    hdr = image.header
    hdr["descrip"] = b""
    hdr["aux_file"] = b""
    hdr["db_name"] = b""
    hdr["intent_name"] = b""
    hdr.extensions.clear()
    return image


def write_volume(path: str | os.PathLike, volume: np.ndarray, spacing: Sequence[float], *, is_mask: bool = False,
                 affine: Optional[np.ndarray] = None) -> None:
    """Write one volume atomically. Images are float32, ``(D, H, W)`` or ``(C, D, H, W)`` (written as
    a 3D file for C = 1, else 4D with channels last); label maps uint8 ``(D, H, W)``."""
    volume = np.asarray(volume)
    if volume.ndim == 4 and not is_mask:
        volume = volume[0] if volume.shape[0] == 1 else np.moveaxis(volume, 0, -1)
    if volume.ndim not in (3, 4) or (is_mask and volume.ndim != 3):
        raise ValueError(f"write_volume: expected a (D, H, W) volume or (C, D, H, W) channels, got shape {volume.shape}")
    affine = grid_affine(volume.shape[:3], spacing) if affine is None else affine
    data = volume.astype(np.uint8 if is_mask else np.float32)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=ALIGNED_ANAT)
    img.set_sform(affine, code=ALIGNED_ANAT)
    img.header.set_xyzt_units(xyz="mm")
    if is_mask:
        img.header.set_intent("label")
    _scrubbed(img)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
