"""Denoiser: shapes and save/load round trips over a table of 2D/3D cases, config, checkpointing, invalid arguments."""

from __future__ import annotations

import copy
import inspect
import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from raysynth.config import DiffusionConfig
from raysynth.diffusion import networks
from raysynth.diffusion.networks import Denoiser, build_denoiser, norm_groups

SAVED_FILES = {"config.json", "diffusion_pytorch_model.safetensors"}

# (dims, channels, in_channels, num_classes, attention, gradient_checkpointing), all at side 16
CASES = [
    (2, [8, 16], 1, 1, False, False),
    (2, [8, 16, 16], 2, 3, True, True),
    (2, [12, 24], 3, 2, True, False),  # widths 8 does not divide: one attention head, 4 norm groups
    (3, [8, 16], 1, 2, False, True),
    (3, [8, 16, 16], 3, 4, True, False),
    (3, [8, 16], 2, 2, True, True),
]
CASE_IDS = [f"{d}d-{'x'.join(map(str, ch))}-c{c}-k{k}{'-attn' if a else ''}{'-ckpt' if g else ''}"
            for d, ch, c, k, a, g in CASES]


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights with visible effect (MONAI zero-initialises its output conv); norms keep their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs(dims: int, in_channels: int, num_classes: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, *([16] * dims), generator=g)
    labels = torch.arange(batch) % num_classes
    return x, labels


def _public(config) -> dict:
    """The constructor arguments of a config (diffusers adds _class_name, _diffusers_version, _name_or_path)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _init_arguments() -> set[str]:
    return set(inspect.signature(Denoiser.__init__).parameters) - {"self"}


@pytest.fixture
def no_network(monkeypatch):
    """Loading a local folder must not touch the network, even without HF_HUB_OFFLINE."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---- the table: shapes, config, round trip -----------------------------------------------------


@pytest.mark.parametrize("dims,channels,in_channels,num_classes,attention,ckpt", CASES, ids=CASE_IDS)
def test_forward_shape_int_and_float_timesteps(dims, channels, in_channels, num_classes, attention, ckpt):
    cfg = DiffusionConfig(channels=channels, attention=attention, gradient_checkpointing=ckpt)
    model = build_denoiser(cfg, dims=dims, in_channels=in_channels, image_size=16, num_classes=num_classes)
    x, labels = _inputs(dims, in_channels, num_classes)
    with torch.no_grad():
        out_int = model(x, torch.tensor([3, 999]), labels)
        out_float = model(x, torch.tensor([-1.3, 0.4]), labels)  # EDM c_noise values
        out_scalar = model(x, torch.tensor(0.5), labels)  # a scalar t is broadcast over the batch
    assert out_int.shape == out_float.shape == out_scalar.shape == x.shape
    assert out_int.dtype == torch.float32
    assert torch.isfinite(out_int).all() and torch.isfinite(out_float).all()
    assert model.is_gradient_checkpointing is ckpt


@pytest.mark.parametrize("dims,channels,in_channels,num_classes,attention,ckpt", CASES, ids=CASE_IDS)
def test_config_holds_every_constructor_argument(dims, channels, in_channels, num_classes, attention, ckpt):
    model = Denoiser(dims, in_channels, 16, num_classes, tuple(channels), 1, attention, ckpt)  # all positional
    expected = {"dims": dims, "in_channels": in_channels, "image_size": 16, "num_classes": num_classes,
                "channels": channels, "layers_per_block": 1, "attention": attention, "gradient_checkpointing": ckpt,
                "null_class": False}
    assert set(expected) == _init_arguments()
    assert dict(model.config) == expected  # JSON-plain values (a list, not the tuple passed), nothing else
    # from_config rebuilds the same architecture (diffusers' _use_default_values would drop positional args).
    clone = Denoiser.from_config(model.config)
    assert dict(clone.config) == expected
    assert clone.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("dims,channels,in_channels,num_classes,attention,ckpt", CASES, ids=CASE_IDS)
def test_save_load_round_trip(tmp_path, no_network, dims, channels, in_channels, num_classes, attention, ckpt):
    model = Denoiser(dims, in_channels, 16, num_classes, channels=channels, attention=attention,
                     gradient_checkpointing=ckpt)
    _randomise(model)
    model.save_pretrained(tmp_path / "m")
    assert set(os.listdir(tmp_path / "m")) == SAVED_FILES
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["_class_name"] == "Denoiser" and _public(saved) == dict(_public(model.config))

    loaded = Denoiser.from_pretrained(tmp_path / "m", map_location="cpu")
    assert isinstance(loaded, Denoiser) and not loaded.training
    assert _public(loaded.config) == _public(model.config)
    assert loaded.is_gradient_checkpointing is ckpt
    x, labels = _inputs(dims, in_channels, num_classes)
    t = torch.tensor([1.5, 7.0])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, labels), loaded(x, t, labels))


# ---- loading: devices, overrides, what must not load -------------------------------------------


def test_from_pretrained_map_location_and_overrides(tmp_path, no_network):
    model = Denoiser(2, 1, 16, 2, channels=[8, 16])
    model.save_pretrained(str(tmp_path))  # a str path works as well as a Path
    loaded = Denoiser.from_pretrained(str(tmp_path), map_location=torch.device("cpu"), gradient_checkpointing=True)
    assert loaded.device == torch.device("cpu")
    assert loaded.is_gradient_checkpointing and loaded.config["gradient_checkpointing"] is True
    loaded, info = Denoiser.from_pretrained(tmp_path, map_location=None, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_from_pretrained_missing_files(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Denoiser.from_pretrained(tmp_path)
    # A path that does not exist is not taken for a Hub repository id.
    with pytest.raises(FileNotFoundError, match="config.json"):
        Denoiser.from_pretrained(tmp_path / "not_there")
    Denoiser(2, 1, 16, 2, channels=[8, 16]).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        Denoiser.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize(
    "saved,loaded",
    [
        (dict(dims=2, channels=[8, 16, 16]), dict(dims=2, channels=[8, 16])),  # fewer levels: unexpected keys
        (dict(dims=2, channels=[8, 16]), dict(dims=2, channels=[16, 32])),  # same keys, other shapes
        (dict(dims=2, channels=[8, 16]), dict(dims=2, channels=[8, 16], attention=True)),  # missing keys
        (dict(dims=3, channels=[8, 16]), dict(dims=2, channels=[8, 16])),  # another library's keys
        (dict(dims=2, channels=[8, 16], in_channels=2), dict(dims=2, channels=[8, 16], in_channels=1)),
    ],
)
def test_weights_of_another_config_do_not_load(tmp_path, no_network, saved, loaded):
    base = dict(in_channels=1, image_size=16, num_classes=2)
    Denoiser(**{**base, **saved}).save_pretrained(tmp_path / "other")
    Denoiser(**{**base, **loaded}).save_pretrained(tmp_path / "m")
    # The config of one folder with the weights of the other: diffusers' size-mismatch error, or ours for
    # missing or unexpected keys (where diffusers would only warn and leave weights at their init).
    os.replace(tmp_path / "other" / "diffusion_pytorch_model.safetensors",
               tmp_path / "m" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(RuntimeError, match="size mismatch|do not fit"):
        Denoiser.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("override", [dict(channels=[16, 32]), dict(attention=True), dict(num_classes=3),
                                      dict(layers_per_block=2), dict(dims=3)])
def test_an_override_that_changes_the_weights_does_not_load(tmp_path, no_network, override):
    Denoiser(2, 1, 16, 2, channels=[8, 16]).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError):
        Denoiser.from_pretrained(tmp_path, **override)


def test_a_folder_of_another_model_class_does_not_load(tmp_path, no_network):
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                layers_per_block=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="UNet2DModel"):
        Denoiser.from_pretrained(tmp_path)


@pytest.mark.parametrize("dims", [2, 3])
def test_folders_saved_before_modelmixin_still_load(tmp_path, no_network, dims):
    """The hand-made layout (config.json of the weight-defining arguments + model.safetensors)."""
    model = Denoiser(dims, 1, 16, 2, channels=[8, 16], attention=True).eval()
    _randomise(model)
    old_config = {k: v for k, v in model.config.items() if k != "gradient_checkpointing"}
    (tmp_path / "config.json").write_text(json.dumps(old_config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded = Denoiser.from_pretrained(tmp_path, map_location="cpu")
    assert _public(loaded.config) == dict(model.config) and not loaded.training
    x, labels = _inputs(dims, 1, 2)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([3.0, 0.5]), labels), loaded(x, torch.tensor([3.0, 0.5]), labels))
    # ... and weights that do not fit are an error there too.
    save_file({k: v for k, v in list(model.state_dict().items())[1:]}, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="missing_keys"):
        Denoiser.from_pretrained(tmp_path)


def test_ema_weights_are_what_gets_saved(tmp_path, no_network):
    """What ``GeneratorFit.export`` does: EMA weights swapped into the model, then ``save_pretrained``."""
    from diffusers.training_utils import EMAModel

    model = Denoiser(2, 1, 16, 2, channels=[8, 16])
    ema = EMAModel(model.parameters(), decay=0.9)
    _randomise(model, seed=1)
    ema.step(model.parameters())
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    model.save_pretrained(tmp_path)
    reference = copy.deepcopy(model).eval()
    ema.restore(model.parameters())
    loaded = Denoiser.from_pretrained(tmp_path)
    x, labels = _inputs(2, 1, 2)
    with torch.no_grad():
        assert torch.equal(reference(x, torch.tensor([1, 2]), labels), loaded(x, torch.tensor([1, 2]), labels))
        assert not torch.equal(model.eval()(x, torch.tensor([1, 2]), labels), loaded(x, torch.tensor([1, 2]), labels))


def test_a_2d_denoiser_does_not_import_monai(tmp_path):
    code = f"""
import sys
from raysynth.diffusion.networks import Denoiser
Denoiser(2, 1, 16, 2, channels=[8, 16], gradient_checkpointing=True).save_pretrained({str(tmp_path)!r})
Denoiser.from_pretrained({str(tmp_path)!r}, map_location="cpu")
print(sorted(m for m in sys.modules if m.split(".")[0] == "monai"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---- behaviour ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_class_label_changes_output(dims):
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
    plain = Denoiser(dims, 1, 16, 2, channels=[8, 16])
    checked = Denoiser(dims, 1, 16, 2, channels=[8, 16], gradient_checkpointing=True)
    _randomise(plain)
    checked.load_state_dict(plain.state_dict())  # same keys: checkpointing does not rename modules
    x, labels = _inputs(dims, 1, 2)
    t = torch.tensor([5, 500])
    for m in (plain, checked):
        m(x, t, labels).pow(2).mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checked.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # EMA copies and Ray's pickling must keep working with checkpointing on.
    clone = pickle.loads(pickle.dumps(copy.deepcopy(checked)))
    assert clone.is_gradient_checkpointing and dict(clone.config) == dict(checked.config)


@pytest.mark.parametrize("dims", [2, 3])
def test_enable_disable_gradient_checkpointing(dims):
    model = Denoiser(dims, 1, 16, 2, channels=[8, 16])
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing and model.config["gradient_checkpointing"] is True
    pickle.dumps(model)  # the 2D checkpoint function is module-level, not diffusers' closure
    if dims == 3:
        assert any(type(m) is networks._CheckpointedResnetBlock for m in model.modules())
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing and model.config["gradient_checkpointing"] is False
    assert not any(type(m).__name__ == "_CheckpointedResnetBlock" for m in model.modules())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_ddp_wrapping_trains_and_the_inner_model_saves(tmp_path, no_network):
    """What Ray Train's prepare_model does with several workers, with a single gloo process."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = Denoiser(2, 1, 16, 2, channels=[8, 16], gradient_checkpointing=True)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        x, labels = _inputs(2, 1, 2)
        wrapped(x, torch.tensor([1, 2]), labels).pow(2).mean().backward()
        assert all(p.grad is not None for p in model.parameters())
        wrapped.module.save_pretrained(tmp_path / "m")
    finally:
        dist.destroy_process_group()
    loaded = Denoiser.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model.eval()(x, torch.tensor([1, 2]), labels), loaded(x, torch.tensor([1, 2]), labels))


def test_norm_groups():
    assert norm_groups([32, 64]) == 32
    assert norm_groups([8, 16]) == 8
    assert norm_groups([12, 24]) == 4
    assert norm_groups([7]) == 1


# ---- invalid arguments and inputs ----------------------------------------------------------------

# Each invalid configuration, and the value its message must name.
INVALID_CASES = [
    (dict(dims=1), "dims=1"),
    (dict(dims=4), "dims=4"),
    (dict(dims=2.0), "dims=2.0"),
    (dict(in_channels=0), "in_channels=0"),
    (dict(in_channels=-1), "in_channels=-1"),
    (dict(num_classes=0), "num_classes=0"),
    (dict(image_size=10, channels=[8, 16, 16]), "image_size=10"),
    (dict(image_size=20, channels=[8, 16, 16, 16]), "image_size=20"),
    (dict(image_size=0), "image_size=0"),
    (dict(image_size=16.0), "image_size=16.0"),
    (dict(channels=[]), "channels=[]"),
    (dict(channels=[8, 0]), "channels=[8, 0]"),
    (dict(channels=[8, 16.5]), "channels=[8, 16.5]"),
    (dict(channels="816"), "channels='816'"),
    (dict(channels=8), "channels=8"),
    (dict(layers_per_block=0), "layers_per_block=0"),
]


@pytest.mark.parametrize("override,message", INVALID_CASES, ids=[m for _, m in INVALID_CASES])
def test_invalid_arguments_raise(override, message):
    kwargs = dict(dims=2, in_channels=1, image_size=16, num_classes=2, channels=[8, 16])
    kwargs.update(override)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
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
