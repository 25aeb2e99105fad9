"""How much the latent path's autoencoder loses before diffusion starts: PSNR, SSIM and MS-SSIM of
``D(E(x))`` against ``x`` on a fold's real *test* part (a measurement only: it never feeds
training or selection), and for segmentation the Dice of the reconstructed mask.

MONAI's metrics, on images in [-1, 1] (data range 2), per image channel (sequence), averaged.
MS-SSIM needs each side to exceed ``(kernel - 1) * 2 ** (scales - 1)``: the number of scales is
the largest that fits, up to MONAI's five, with a 7-voxel kernel; below two scales it is not
reported (``None`` with the reason).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from raysynth.diffusion.autoencoder import decode, encode
from raysynth.diffusion.channels import decode_joint, encode_joint

DATA_RANGE = 2.0
MS_SSIM_KERNEL = 7
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, MONAI's default


def ms_ssim_scales(side: int, kernel: int = MS_SSIM_KERNEL) -> int:
    """The most scales (<= 5) whose coarsest level still holds a ``kernel``-sided window."""
    scales = 0
    while scales < len(_MS_SSIM_WEIGHTS) and side > (kernel - 1) * 2 ** scales:
        scales += 1
    return scales


def reconstruction_metrics(model: torch.nn.Module, images: np.ndarray, masks: Optional[np.ndarray],
                           num_mask_classes: int, batch_size: int = 16) -> dict[str, Any]:
    """``images (N, C, *S)`` in [-1, 1] (and ``masks (N, *S)`` for segmentation) through the
    autoencoder and back; returns the metrics, each a mean over images and channels."""
    from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

    # 1. Reconstruct the joint tensor the autoencoder was trained on (image channels, then mask).
    x = encode_joint(torch.from_numpy(images), None if masks is None else torch.from_numpy(masks), num_mask_classes)
    recon = decode(model, encode(model, x, batch_size), batch_size)
    n_image = images.shape[1]
    img, rec_mask = decode_joint(recon, num_mask_classes, n_image)
    real = torch.from_numpy(images).float()
    dims, side = real.ndim - 2, min(real.shape[2:])
    # 2. Per channel, so a 3-sequence image counts each sequence once (SSIM's window is per channel).
    psnr, ssim, ms = [], [], []
    scales = ms_ssim_scales(side)
    for c in range(n_image):
        a, b = img[:, c:c + 1], real[:, c:c + 1]
        psnr.append(float(PSNRMetric(max_val=DATA_RANGE)(a, b).mean()))
        ssim.append(float(SSIMMetric(spatial_dims=dims, data_range=DATA_RANGE, win_size=MS_SSIM_KERNEL)(a, b).mean()))
        if scales >= 2:
            w = _MS_SSIM_WEIGHTS[:scales]
            metric = MultiScaleSSIMMetric(spatial_dims=dims, data_range=DATA_RANGE, kernel_size=MS_SSIM_KERNEL,
                                          weights=tuple(v / sum(w) for v in w))
            # MS-SSIM multiplies contrast terms that can be negative: shift the images to [0, 2].
            ms.append(float(metric(a + 1.0, b + 1.0).mean()))
    out: dict[str, Any] = {
        "n": int(len(images)), "psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
        "ms_ssim": float(np.mean(ms)) if ms else None,
        "ms_ssim_scales": scales if scales >= 2 else None,
        "l1": float((img - real).abs().mean()),
    }
    if scales < 2:
        out["ms_ssim_why"] = f"side {side} too small for two scales of a {MS_SSIM_KERNEL}-voxel window"
    if masks is not None and rec_mask is not None:
        out["mask_dice"] = _foreground_dice(rec_mask.numpy(), masks)
    return out


def _foreground_dice(predicted: np.ndarray, truth: np.ndarray) -> Optional[float]:
    """Dice of foreground (any label > 0) over all images; None when neither has any."""
    p, t = predicted > 0, truth > 0
    denominator = int(p.sum() + t.sum())
    return None if denominator == 0 else float(2 * np.logical_and(p, t).sum() / denominator)
