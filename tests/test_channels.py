"""Joint image+mask channels: shapes, exact mask round trip, invalid inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysynth.diffusion.channels import decode_joint, decode_joint_numpy, encode_joint, num_channels

# (spatial shape, num_mask_classes)
CASES = [((16, 16), 0), ((16, 16), 2), ((16, 16), 4), ((8, 8, 8), 3), ((16, 16, 16), 0)]


def _data(spatial, k, batch=3, seed=0, c=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, c, *spatial, generator=g) * 2 - 1
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


@pytest.mark.parametrize("spatial,k,c", [((16, 16), 0, 3), ((16, 16), 2, 3), ((8, 8, 8), 3, 2), ((8, 8), 2, 4)])
def test_round_trip_multichannel(spatial, k, c):
    """C image channels (sequences), then K one-hot mask channels; both come back exactly."""
    images, masks = _data(spatial, k, c=c)
    x = encode_joint(images, masks, k)
    assert x.shape == (3, num_channels(k, c), *spatial) == (3, c + k, *spatial)
    torch.testing.assert_close(x[:, :c], images)
    images_back, masks_back = decode_joint(x, k, c)
    torch.testing.assert_close(images_back, images)
    assert (masks_back is None) == (k == 0)
    if k:
        assert torch.equal(masks_back, masks)
    with pytest.raises(ValueError, match="expected"):
        decode_joint(x, k)  # one image channel assumed: the channel count does not add up
    if k:  # a mask with a channel axis is refused
        with pytest.raises(ValueError, match="differs from images"):
            encode_joint(images, masks[:, None].expand(-1, c, *spatial), k)


def test_encode_rejects_images_without_channel_axis():
    with pytest.raises(ValueError, match="channel axis"):
        encode_joint(torch.zeros(2, 8), None, 0)


def test_noisy_joint_decodes_by_argmax_and_clips():
    images, masks = _data((16, 16), 3)
    x = encode_joint(images, masks, 3)
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    noisy[:, 0] *= 3  # push the image channel out of range
    images_back, masks_back = decode_joint(noisy, 3)
    assert images_back.min() >= -1 and images_back.max() <= 1
    assert torch.equal(masks_back, noisy[:, 1:].argmax(dim=1).to(torch.uint8))


def test_numpy_in_and_out():
    images = np.random.default_rng(0).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
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
    images = torch.zeros(2, 1, *spatial)
    masks = None if mask_fn is None else mask_fn((2, *spatial))
    with pytest.raises(ValueError, match=message):
        encode_joint(images, masks, k)


def test_encode_rejects_integer_images():
    with pytest.raises(ValueError, match="floating point"):
        encode_joint(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), None, 0)


@pytest.mark.parametrize("shape,k", [((2, 2, 8, 8), 2), ((2, 3, 8, 8), 0), ((2, 8), 0)])
def test_decode_invalid(shape, k):
    with pytest.raises(ValueError, match="expected"):
        decode_joint(torch.zeros(shape), k)


# ---- the explicit channel axis of records ------------------------------------------------------


def test_imageset_requires_the_channel_axis_and_parquet_stores_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysynth.data.schema import REAL_SCHEMA, ImageSet, read_parquet, write_parquet

    ids = ["a", "b"]
    with pytest.raises(ValueError, match=r"channel axis is explicit.*images\[:, None\]"):
        ImageSet(ids, ids, np.zeros(2, np.int64), np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="masks shape"):
        ImageSet(ids, ids, np.zeros(2, np.int64), np.zeros((2, 3, 8, 8), np.float32), masks=np.zeros((2, 3, 8, 8), np.uint8))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    data = ImageSet(ids, ids, np.zeros(2, np.int64), images, masks=np.ones((2, 8, 8), np.uint8))
    assert data.num_channels == 3 and data.spatial_shape == (8, 8) and data.dims == 2 and data.record_shape == (3, 8, 8)
    write_parquet(data, tmp_path / "d.parquet")
    assert pq.read_table(tmp_path / "d.parquet").column("shape")[0].as_py() == [3, 8, 8]
    back = read_parquet(tmp_path / "d.parquet")
    np.testing.assert_array_equal(back.images, images)
    assert back.masks.shape == (2, 8, 8)
    # A file from before the channel axis (shape [H, W]) is refused with a clear message.
    old = pa.table({"id": ids, "subject": ids, "label": pa.array([0, 0], pa.int32()),
                    "image": [images[i, 0].tobytes() for i in range(2)], "mask": pa.array([None, None], pa.binary()),
                    "shape": [[8, 8]] * 2, "spacing": [[1.0, 1.0]] * 2}, schema=REAL_SCHEMA)
    pq.write_table(old, tmp_path / "old.parquet")
    with pytest.raises(ValueError, match="no channel axis.*raysynth prepare"):
        read_parquet(tmp_path / "old.parquet")


def test_figures_show_three_channels_as_rgb_and_others_as_the_first(tmp_path):
    from raysynth.render.figures import channel_note, grid_png, image_view
    from raysynth.render.quality_figures import plot_nearest_pairs

    rng = np.random.default_rng(0)
    for c, shown in ((1, 1), (3, 3), (4, 1)):
        images = rng.uniform(-1, 1, (3, c, 8, 8)).astype(np.float32)
        assert image_view(images[0]).shape == (shown, 8, 8)
        assert grid_png(images, np.zeros((3, 8, 8), np.uint8), title="t").startswith(b"\x89PNG")
        plot_nearest_pairs(images, images, np.ones(3), tmp_path / f"p{c}.png", 0, 0.9)
        assert (tmp_path / f"p{c}.png").is_file()
    np.testing.assert_array_equal(image_view(images[0]), images[0, :1])
    assert "first of 4" in channel_note(4) and channel_note(1) == ""
    volumes = rng.uniform(-1, 1, (2, 3, 6, 8, 8)).astype(np.float32)
    assert image_view(volumes[0]).shape == (3, 8, 8) and image_view(volumes[0], 2).shape == (3, 6, 8)
    assert grid_png(volumes).startswith(b"\x89PNG")
