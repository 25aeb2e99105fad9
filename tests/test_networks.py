"""Denoiser: shapes over a table of 2D/3D cases, save/load round trip, checkpointing, invalid arguments."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from raysynth.config import DiffusionConfig
from raysynth.diffusion.networks import Denoiser, build_denoiser, norm_groups

# (dims, channels, in_channels, num_classes, attention)
SHAPE_CASES = [
    (2, [8, 16], 1, 1, False),
    (2, [8, 16, 16], 2, 3, True),
    (2, [12, 24], 3, 2, True),  # widths 8 does not divide: one attention head, 4 norm groups
    (3, [8, 16], 1, 2, False),
    (3, [8, 16, 16], 3, 4, True),
]


def _randomise(model: torch.nn.Module) -> None:
    """Weights with visible effect (MONAI zero-initialises its output conv); norms keep their init."""
    for p in model.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.1)


def _inputs(dims: int, in_channels: int, num_classes: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, *([16] * dims), generator=g)
    labels = torch.arange(batch) % num_classes
    return x, labels


@pytest.mark.parametrize("dims,channels,in_channels,num_classes,attention", SHAPE_CASES)
def test_forward_shape_int_and_float_timesteps(dims, channels, in_channels, num_classes, attention):
    cfg = DiffusionConfig(channels=channels, attention=attention)
    model = build_denoiser(cfg, dims=dims, in_channels=in_channels, image_size=16, num_classes=num_classes)
    x, labels = _inputs(dims, in_channels, num_classes)
    with torch.no_grad():
        out_int = model(x, torch.tensor([3, 999]), labels)
        out_float = model(x, torch.tensor([-1.3, 0.4]), labels)  # EDM c_noise values
    assert out_int.shape == x.shape and out_float.shape == x.shape
    assert out_int.dtype == torch.float32
    assert torch.isfinite(out_int).all() and torch.isfinite(out_float).all()
    assert model.config == {"dims": dims, "in_channels": in_channels, "image_size": 16, "num_classes": num_classes,
                            "channels": channels, "layers_per_block": 1, "attention": attention}


@pytest.mark.parametrize("dims", [2, 3])
def test_class_label_changes_output(dims):
    torch.manual_seed(0)
    model = Denoiser(dims, 1, 16, 2, channels=[8, 16])
    _randomise(model)
    x = torch.randn(1, 1, *([16] * dims))
    t = torch.tensor([10])
    with torch.no_grad():
        a, b = model(x, t, torch.tensor([0])), model(x, t, torch.tensor([1]))
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_autocast_forward_backward(dims):
    model = Denoiser(dims, 2, 16, 2, channels=[8, 16], attention=True)
    x, labels = _inputs(dims, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([0.1, -0.7]), labels)
        loss = out.float().pow(2).mean()
    loss.backward()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradient_checkpointing_gives_same_gradients(dims):
    torch.manual_seed(0)
    plain = Denoiser(dims, 1, 16, 2, channels=[8, 16])
    checked = Denoiser(dims, 1, 16, 2, channels=[8, 16], gradient_checkpointing=True)
    checked.load_state_dict(plain.state_dict())  # same keys: checkpointing does not rename modules
    _randomise(plain)
    checked.load_state_dict(plain.state_dict())
    x, labels = _inputs(dims, 1, 2)
    t = torch.tensor([5, 500])
    for m in (plain, checked):
        m(x, t, labels).pow(2).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checked.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # EMA copies and Ray's pickling must keep working with checkpointing on.
    pickle.loads(pickle.dumps(copy.deepcopy(checked)))


@pytest.mark.parametrize("dims", [2, 3])
def test_save_load_round_trip(tmp_path, dims):
    model = Denoiser(dims, 2, 16, 3, channels=[8, 16], attention=True)
    _randomise(model)
    model.save_pretrained(tmp_path / "m")
    loaded = Denoiser.from_pretrained(tmp_path / "m", map_location="cpu")
    assert loaded.config == model.config
    x, labels = _inputs(dims, 2, 3)
    t = torch.tensor([1.5, 7.0])
    with torch.no_grad():
        assert torch.equal(model(x, t, labels), loaded(x, t, labels))


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Denoiser.from_pretrained(tmp_path)


def test_norm_groups():
    assert norm_groups([32, 64]) == 32
    assert norm_groups([8, 16]) == 8
    assert norm_groups([12, 24]) == 4
    assert norm_groups([7]) == 1


# Each invalid configuration, and the value its message must name.
INVALID_CASES = [
    (dict(dims=1), "dims=1"),
    (dict(dims=4), "dims=4"),
    (dict(in_channels=0), "in_channels=0"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(image_size=10, channels=[8, 16, 16]), "image_size=10"),
    (dict(image_size=0), "image_size=0"),
    (dict(channels=[]), "channels=[]"),
    (dict(channels=[8, 0]), "channels=[8, 0]"),
    (dict(layers_per_block=0), "layers_per_block=0"),
]


@pytest.mark.parametrize("override,message", INVALID_CASES)
def test_invalid_arguments_raise(override, message):
    kwargs = dict(dims=2, in_channels=1, image_size=16, num_classes=2, channels=[8, 16])
    kwargs.update(override)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Denoiser(**kwargs)


@pytest.mark.parametrize(
    "x_shape,t,labels,message",
    [
        ((2, 2, 16, 16), [1, 2], [0, 1], "expected"),  # wrong channel count
        ((2, 1, 16, 16, 16), [1, 2], [0, 1], "expected"),  # 3D input to a 2D net
        ((2, 1, 16, 10), [1, 2], [0, 1], "divisible"),
        ((2, 1, 16, 16), [1, 2, 3], [0, 1], "must both be"),
    ],
)
def test_invalid_inputs_raise(x_shape, t, labels, message):
    model = Denoiser(2, 1, 16, 2, channels=[8, 16, 16])
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(x_shape), torch.tensor(t), torch.tensor(labels))
