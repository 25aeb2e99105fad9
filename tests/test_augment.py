"""Classical augmentation and graded corruptions: determinism, range, shapes, monotone severity."""

import numpy as np
import pytest
import torch

from raysynth.downstream.augment import CORRUPTIONS, build_classical_augment, build_corruption


pytestmark = pytest.mark.usefixtures("one_thread")


def phantom(n=3, size=16, dims=2, seed=0):
    """(N, 1, *S) float32 in [-1, 1]: a bright off-centre disc on a dark background, mildly noisy."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * dims, indexing="ij"))
    out = []
    for _ in range(n):
        centre = rng.uniform(size * 0.35, size * 0.6, dims).reshape(-1, *[1] * dims)
        disc = ((grid - centre) ** 2).sum(0) < (size * 0.3) ** 2
        out.append(np.where(disc, 0.5, -0.8) + rng.normal(0, 0.05, (size,) * dims))
    return np.clip(np.stack(out), -1, 1).astype(np.float32)[:, None]


def batch(dims=2, n=6, size=16):
    images = torch.from_numpy(phantom(n, size, dims))
    return images, (images[:, 0] > 0).to(torch.uint8)


@pytest.mark.parametrize("dims,segmentation", [(2, False), (2, True), (3, False), (3, True)])
def test_augment_is_deterministic_in_range_and_keeps_shapes(dims, segmentation):
    x, m = batch(dims, size=16 if dims == 2 else 12)
    masks = m if segmentation else None
    out1 = build_classical_augment(dims, seed=3, segmentation=segmentation)(x, masks)
    out2 = build_classical_augment(dims, seed=3, segmentation=segmentation)(x, masks)
    other = build_classical_augment(dims, seed=4, segmentation=segmentation)(x, masks)
    assert torch.equal(out1[0], out2[0]) and not torch.equal(out1[0], other[0])
    assert out1[0].shape == x.shape and out1[0].dtype == x.dtype
    assert out1[0].min() >= -1 and out1[0].max() <= 1
    if segmentation:
        assert torch.equal(out1[1], out2[1])
        assert out1[1].shape == m.shape and out1[1].dtype == m.dtype
        assert set(out1[1].unique().tolist()) <= {0, 1}
    else:
        assert out1[1] is None


def test_augment_moves_image_and_mask_together():
    # Small off-centre rectangles: any flip or shift moves them far from where they started.
    rng = np.random.default_rng(0)
    x = np.full((8, 16, 16), -0.8, np.float32)
    for img in x:
        r, c = rng.integers(1, 5, 2)
        img[r : r + 6, c : c + 5] = 0.5
    x = torch.from_numpy(x)
    m = (x > 0).to(torch.uint8)
    augment = build_classical_augment(2, seed=0, segmentation=True)
    moved = []
    for _ in range(3):  # several draws, so flips, affine and elastic all get exercised
        ax, am = augment(x[:, None], m)
        for img, mask, before in zip(ax[:, 0], am, m):
            bright = img > img.mean()  # the rectangle, whatever bias, gamma and noise did
            assert (bright == mask.bool()).float().mean() >= 0.93
            moved.append(float((bright == before.bool()).float().mean()))
    assert np.mean(moved) < 0.9  # the masks did move: the check above is not vacuous


def test_augment_stream_advances_between_calls():
    x, _ = batch(2)
    augment = build_classical_augment(2, seed=0, segmentation=False)
    assert not torch.equal(augment(x)[0], augment(x)[0])


@pytest.mark.parametrize(
    "build,call,match",
    [
        (lambda: build_classical_augment(4, 0, False), None, "dims"),
        (lambda: build_classical_augment(2, 0, False), lambda a: a(torch.zeros(2, 16, 16)), "images"),
        (lambda: build_classical_augment(2, 0, True), lambda a: a(torch.zeros(2, 1, 16, 16)), "masks"),
        (lambda: build_classical_augment(2, 0, True),
         lambda a: a(torch.zeros(2, 1, 16, 16), torch.zeros(2, 8, 8)), "masks"),
    ],
)
def test_augment_invalid_arguments(build, call, match):
    with pytest.raises(ValueError, match=match):
        augment = build()
        call(augment)


def high_frequency_energy(x):
    return float(np.mean(np.diff(x, axis=-1) ** 2) + np.mean(np.diff(x, axis=-2) ** 2))


def residual_std(x, clean):
    return float(np.std(x - clean))


# name -> (statistic, +1 if it grows with severity, -1 if it falls)
MONOTONE = {
    "noise": (residual_std, 1),
    "bias": (residual_std, 1),
    "ghosting": (residual_std, 1),
    "spike": (residual_std, 1),
    "gibbs": (high_frequency_energy, -1),
    "blur": (high_frequency_energy, -1),
    "contrast": (residual_std, 1),
}


def test_every_corruption_has_a_monotonicity_check():
    assert set(MONOTONE) == set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_severity_is_monotone(name):
    clean = phantom(4, 16, 2)
    statistic, sign = MONOTONE[name]
    values = []
    for severity in range(1, 6):
        out = build_corruption(name, severity, seed=0, dims=2)(clean)
        values.append(statistic(out, clean) if statistic is residual_std else statistic(out))
    assert np.all(sign * np.diff(values) > 0), values
    if statistic is high_frequency_energy:
        assert values[0] < high_frequency_energy(clean)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_deterministic_in_range_and_type_preserving(name):
    clean = phantom(3, 16, 2, seed=1)
    corrupt = build_corruption(name, 3, seed=5, dims=2)
    out = corrupt(clean)
    assert np.array_equal(out, corrupt(clean))  # the stream restarts on every call
    assert np.array_equal(out, build_corruption(name, 3, seed=5, dims=2)(clean))
    assert out.dtype == np.float32 and out.shape == clean.shape
    assert out.min() >= -1 and out.max() <= 1 and not np.allclose(out, clean)
    tensor_out = corrupt(torch.from_numpy(clean))
    assert isinstance(tensor_out, torch.Tensor) and np.allclose(tensor_out.numpy(), out, atol=1e-6)


@pytest.mark.parametrize("name", ["noise", "bias", "ghosting", "spike"])
def test_random_corruptions_depend_on_the_seed(name):
    clean = phantom(2, 16, 2)
    assert not np.array_equal(build_corruption(name, 3, 0, 2)(clean), build_corruption(name, 3, 1, 2)(clean))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_runs_in_3d(name):
    clean = phantom(2, 8, 3)
    out = build_corruption(name, 2, seed=0, dims=3)(clean)
    assert out.shape == clean.shape and np.isfinite(out).all()


@pytest.mark.parametrize(
    "args,match",
    [
        (("motion", 1, 0, 2), "noise"),  # the message lists the valid names
        (("noise", 0, 0, 2), "severity"),
        (("noise", 6, 0, 2), "severity"),
        (("noise", 2.5, 0, 2), "severity"),
        (("noise", 1, 0, 1), "dims"),
    ],
)
def test_corruption_invalid_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_corruption(*args)


def test_corruption_rejects_wrong_dimensionality():
    with pytest.raises(ValueError, match="images"):
        build_corruption("blur", 1, 0, dims=3)(phantom(2, 8, 2))


def test_augment_three_channels_share_the_spatial_transform():
    """Three identical sequences stay identical under flips, affine and elastic moves: one
    spatial draw per sample for all channels (intensity transforms may differ by channel)."""
    x, m = batch(2)
    x3 = x.repeat(1, 3, 1, 1)
    out, masks = build_classical_augment(2, 0, segmentation=True)(x3, m)
    assert out.shape == x3.shape and masks.shape == m.shape
    # where the mask says foreground, every channel is bright; where background, dark (shared geometry)
    for c in range(3):
        inside, outside = out[:, c][masks == 1], out[:, c][masks == 0]
        assert float(inside.mean()) > float(outside.mean()) + 0.5


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_acts_on_every_channel(name):
    clean = phantom(3, 16, 2, seed=1)
    multi = np.concatenate([clean, -clean, clean * 0.5], axis=1)  # three sequences
    out = build_corruption(name, 3, seed=5, dims=2)(multi)
    assert out.shape == multi.shape and out.dtype == np.float32 and out.min() >= -1 and out.max() <= 1
    for c in range(3):
        assert not np.allclose(out[:, c], multi[:, c])
    if name in ("gibbs", "blur"):  # deterministic and channel-wise: each channel as if alone
        np.testing.assert_allclose(out[:, :1], build_corruption(name, 3, seed=5, dims=2)(clean), atol=1e-6)
