"""Joint image+mask channels: shapes, exact mask round trip, invalid inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysynth.diffusion.channels import decode_joint, decode_joint_numpy, encode_joint, num_channels

# (spatial shape, num_mask_classes)
CASES = [((16, 16), 0), ((16, 16), 2), ((16, 16), 4), ((8, 8, 8), 3), ((16, 16, 16), 0)]


def _data(spatial, k, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, *spatial, generator=g) * 2 - 1
    masks = torch.randint(0, k, (batch, *spatial), generator=g).to(torch.uint8) if k else None
    return images, masks


@pytest.mark.parametrize("spatial,k", CASES)
def test_round_trip(spatial, k):
    images, masks = _data(spatial, k)
    x = encode_joint(images, masks, k)
    assert x.shape == (3, num_channels(k), *spatial) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    images_back, masks_back = decode_joint(x, k)
    torch.testing.assert_close(images_back, images)
    if k:
        assert masks_back.dtype == torch.uint8 and torch.equal(masks_back, masks)
        # one-hot channels are exactly {-1, 1} and one of them is +1 per voxel
        assert set(torch.unique(x[:, 1:]).tolist()) <= {-1.0, 1.0}
        assert torch.equal((x[:, 1:] > 0).sum(dim=1), torch.ones_like(masks, dtype=torch.long))
    else:
        assert masks_back is None


def test_noisy_joint_decodes_by_argmax_and_clips():
    images, masks = _data((16, 16), 3)
    x = encode_joint(images, masks, 3)
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noisy[:, 0] *= 3  # push the image channel out of range
    images_back, masks_back = decode_joint(noisy, 3)
    assert images_back.min() >= -1 and images_back.max() <= 1
    assert torch.equal(masks_back, noisy[:, 1:].argmax(dim=1).to(torch.uint8))


def test_numpy_in_and_out():
    images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8)).astype(np.float32)
    masks = np.random.default_rng(1).integers(0, 2, (2, 8, 8)).astype(np.uint8)
    x = encode_joint(images, masks, 2)
    images_back, masks_back = decode_joint_numpy(x, 2)
    assert images_back.dtype == np.float32 and masks_back.dtype == np.uint8
    np.testing.assert_array_equal(masks_back, masks)
    np.testing.assert_allclose(images_back, images)


def test_num_channels():
    assert num_channels(0) == 1
    assert num_channels(2) == 3
    assert num_channels(256) == 257


@pytest.mark.parametrize(
    "spatial,k,mask_fn,message",
    [
        ((8, 8), 1, None, "num_mask_classes=1"),
        ((8, 8), -1, None, "num_mask_classes=-1"),
        ((8, 8), 2, None, "no masks were given"),
        ((8, 8), 0, lambda m: torch.zeros(m, dtype=torch.uint8), "num_mask_classes=0"),
        ((8, 8), 2, lambda m: torch.full(m, 2, dtype=torch.uint8), r"outside \[0, 1\]"),
        ((8, 8), 2, lambda m: torch.zeros(m), "integer labels"),
        ((8, 8), 2, lambda m: torch.zeros((m[0], 4, 4), dtype=torch.uint8), "differs from images"),
    ],
)
def test_encode_invalid(spatial, k, mask_fn, message):
    images = torch.zeros(2, *spatial)
    masks = None if mask_fn is None else mask_fn((2, *spatial))
    with pytest.raises(ValueError, match=message):
        encode_joint(images, masks, k)


def test_encode_rejects_integer_images():
    with pytest.raises(ValueError, match="floating point"):
        encode_joint(torch.zeros(2, 8, 8, dtype=torch.uint8), None, 0)


@pytest.mark.parametrize("shape,k", [((2, 2, 8, 8), 2), ((2, 3, 8, 8), 0), ((2, 8), 0)])
def test_decode_invalid(shape, k):
    with pytest.raises(ValueError, match="expected"):
        decode_joint(torch.zeros(shape), k)
