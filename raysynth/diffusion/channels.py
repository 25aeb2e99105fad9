"""Image and mask as one multi-channel tensor, so a segmentation generator draws both together.

Channels 0..C-1 are the image's C channels (sequences such as T1, FLAIR, T1c; C = 1 for grey) in
[-1, 1]. For segmentation, channels C..C+K-1 are the one-hot mask over K classes (background
included) mapped from {0, 1} to {-1, 1}: the same range as the image, so one noise scale suits
every channel, and the argmax at decoding needs no threshold. All are learned jointly.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

MAX_MASK_CLASSES = 256  # masks are stored as uint8


def num_channels(num_mask_classes: int, image_channels: int = 1) -> int:
    """Channels of the joint tensor: C for an image alone, C + K with a K-class mask."""
    _check_classes(num_mask_classes)
    if image_channels < 1:
        raise ValueError(f"image_channels={image_channels} must be >= 1")
    return int(image_channels) + num_mask_classes


def encode_joint(
    images: torch.Tensor | np.ndarray,
    masks: Optional[torch.Tensor | np.ndarray],
    num_mask_classes: int,
) -> torch.Tensor:
    """images (B, C, *S) float in [-1, 1], masks (B, *S) integer labels or None -> (B, C + K, *S) float32.

    ``num_mask_classes`` is 0 exactly when ``masks`` is None.
    """
    _check_classes(num_mask_classes)
    images = torch.as_tensor(images)
    if not images.is_floating_point():
        raise ValueError(f"encode_joint: images must be floating point, got {images.dtype}")
    if images.ndim < 3:
        raise ValueError(f"encode_joint: images of shape {tuple(images.shape)} must be (B, C, *S) with a channel axis")
    image_channel = images.to(torch.float32)
    if masks is None:
        if num_mask_classes:
            raise ValueError(f"encode_joint: num_mask_classes={num_mask_classes} but no masks were given")
        return image_channel
    if not num_mask_classes:
        raise ValueError("encode_joint: masks were given but num_mask_classes=0")
    masks = torch.as_tensor(masks, device=images.device)
    if masks.shape != images.shape[:1] + images.shape[2:]:
        raise ValueError(f"encode_joint: masks shape {tuple(masks.shape)} differs from images {tuple(images.shape)}: "
                         f"expected (B, *S) = {tuple(images.shape[:1] + images.shape[2:])}")
    if masks.is_floating_point() or masks.dtype == torch.bool:
        raise ValueError(f"encode_joint: masks must hold integer labels, got {masks.dtype}")
    labels = masks.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_mask_classes):
        raise ValueError(
            f"encode_joint: mask labels span [{int(labels.min())}, {int(labels.max())}], "
            f"outside [0, {num_mask_classes - 1}] for num_mask_classes={num_mask_classes}"
        )
    # (B, *S, K) one-hot -> (B, K, *S), then {0, 1} -> {-1, 1}.
    one_hot = torch.nn.functional.one_hot(labels, num_mask_classes).movedim(-1, 1).to(torch.float32)
    return torch.cat([image_channel, one_hot * 2.0 - 1.0], dim=1)


def decode_joint(x: torch.Tensor, num_mask_classes: int,
                 image_channels: int = 1) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x (B, C + K, *S) -> (images (B, C, *S) float32 clipped to [-1, 1], masks (B, *S) uint8 or None)."""
    expected = num_channels(num_mask_classes, image_channels)
    if x.ndim < 3 or x.shape[1] != expected:
        raise ValueError(
            f"decode_joint: x has shape {tuple(x.shape)}; expected (B, {expected}, *S) for "
            f"{image_channels} image channel(s) and num_mask_classes={num_mask_classes}"
        )
    images = x[:, :image_channels].to(torch.float32).clamp(-1.0, 1.0)
    if not num_mask_classes:
        return images, None
    return images, x[:, image_channels:].argmax(dim=1).to(torch.uint8)


def decode_joint_numpy(x: torch.Tensor, num_mask_classes: int,
                       image_channels: int = 1) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """:func:`decode_joint` as numpy arrays (float32 images, uint8 masks), the layout of ``ImageSet``."""
    images, masks = decode_joint(x, num_mask_classes, image_channels)
    return images.cpu().numpy(), None if masks is None else masks.cpu().numpy()


def _check_classes(num_mask_classes: int) -> None:
    # One class would be a constant channel that carries nothing; 0 means "no mask".
    if num_mask_classes == 1 or not 0 <= num_mask_classes <= MAX_MASK_CLASSES:
        raise ValueError(
            f"num_mask_classes={num_mask_classes} must be 0 (no mask) or in [2, {MAX_MASK_CLASSES}]"
        )
