"""Noise processes: training loss, a short fit, every sampler's shape/range, per-sample determinism, errors."""

from __future__ import annotations

import json

import pytest
import torch

from raysynth.config import DiffusionConfig
from raysynth.diffusion.networks import build_denoiser
from raysynth.diffusion.process import PROCESSES, DDPMProcess, GammaProcess, build_process

SAMPLER_CASES = [("ddpm", "ddpm"), ("ddpm", "ddim"), ("ddpm", "dpmsolver++"), ("gamma", "euler"), ("gamma", "heun"),
                 ("flow", "euler"), ("flow", "heun")]


def _setup(process: str, dims: int = 2, in_channels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    cfg = DiffusionConfig(process=process, channels=[8, 16], gamma=8.0)
    model = build_denoiser(cfg, dims=dims, in_channels=in_channels, image_size=16, num_classes=2)
    return cfg, build_process(cfg), model


def _batch(n: int = 8, dims: int = 2, in_channels: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # smooth blobs in [-1, 1]: something a tiny UNet can learn to denoise within a few steps
    if dims == 2:
        x = torch.nn.functional.avg_pool2d(torch.randn(n, in_channels, 16, 16, generator=g), 5, 1, 2)
    else:
        x = torch.randn(n, in_channels, 16, 16, 16, generator=g)
    return (x / x.abs().amax()).clamp(-1, 1), torch.arange(n) % 2


class PerSample(torch.nn.Module):
    """Runs the wrapped model one sample at a time, so batch composition cannot touch the numerics."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return torch.cat([self.model(x[i : i + 1], t[i : i + 1], y[i : i + 1]) for i in range(len(x))])


@pytest.mark.parametrize("process", ["ddpm", "gamma", "flow"])
def test_build_process_kind(process):
    cfg = DiffusionConfig(process=process)
    assert isinstance(build_process(cfg), PROCESSES[process]) and build_process(cfg).name == process
    assert PROCESSES["ddpm"] is DDPMProcess and PROCESSES["gamma"] is GammaProcess


@pytest.mark.parametrize("process", ["ddpm", "gamma", "flow"])
def test_training_loss_is_finite_scalar_with_gradients(process):
    _, proc, model = _setup(process)
    x0, y = _batch()
    loss = proc.training_loss(model, x0, y, torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the generator fixes t and the noise: same seed, same loss
    again = proc.training_loss(model, x0, y, torch.Generator().manual_seed(0))
    assert torch.equal(loss.detach(), again.detach())


@pytest.mark.parametrize("process", ["ddpm", "gamma", "flow"])
def test_training_reduces_loss_on_a_fixed_batch(process):
    _, proc, model = _setup(process)
    x0, y = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def evaluate() -> float:  # 4 fixed draws of (t, noise), so the comparison is not luck
        with torch.no_grad():
            return sum(float(proc.training_loss(model, x0, y, torch.Generator().manual_seed(100 + k))) for k in range(4))

    before = evaluate()
    for step in range(20):
        loss = proc.training_loss(model, x0, y, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("process,sampler", SAMPLER_CASES)
def test_sampler_shape_and_range(process, sampler):
    _, proc, model = _setup(process, in_channels=2)
    calls = []
    out = proc.sample(model, torch.tensor([0, 1]), (2, 16, 16), sampler, 3,
                      [torch.Generator().manual_seed(s) for s in (0, 1)], progress=lambda d, n: calls.append((d, n)))
    assert out.shape == (2, 2, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()
    evaluations = 5 if sampler == "heun" else 3  # Heun: 2N - 1 network calls
    assert calls == [(k, evaluations) for k in range(1, evaluations + 1)]


@pytest.mark.parametrize("process,sampler", [("ddpm", "ddim"), ("gamma", "heun")])
def test_sampler_3d(process, sampler):
    _, proc, model = _setup(process, dims=3)
    out = proc.sample(model, torch.tensor([1]), (1, 16, 16, 16), sampler, 2, [torch.Generator().manual_seed(0)])
    assert out.shape == (1, 1, 16, 16, 16) and out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("process,sampler", SAMPLER_CASES)
def test_sample_depends_only_on_its_own_seed(process, sampler):
    _, proc, model = _setup(process)

    def run(net, seeds, labels):
        return proc.sample(net, torch.tensor(labels), (1, 16, 16), sampler, 4,
                           [torch.Generator().manual_seed(s) for s in seeds])

    exact = PerSample(model)
    batch, alone = run(exact, [1, 2, 3], [0, 1, 0]), run(exact, [2], [1])
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)
    # With the batched network, batched and single-sample conv kernels differ by ~1e-6, and DDIM's
    # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies that ~150x at t = T-1.
    torch.testing.assert_close(run(model, [1, 2, 3], [0, 1, 0])[1], alone[0], atol=1e-4, rtol=0)
    # and the seed matters
    assert (run(exact, [4], [1])[0] - alone[0]).abs().max() > 0.05


@pytest.mark.parametrize("process,sampler,steps,first", [("ddpm", "ddim", 5, 999), ("ddpm", "ddpm", 10, 999),
                                                         ("ddpm", "dpmsolver++", 5, 999), ("gamma", "euler", 5, 1.0),
                                                         ("flow", "euler", 5, 1000.0)])
def test_make_scheduler_sets_timesteps(process, sampler, steps, first):
    _, proc, _ = _setup(process)
    sch = proc.make_scheduler(sampler, steps)
    assert len(sch.timesteps) == steps
    assert float(sch.timesteps[0]) == pytest.approx(first)


@pytest.mark.parametrize("process", ["ddpm", "gamma", "flow"])
def test_describe_is_json(process):
    _, proc, _ = _setup(process)
    info = json.loads(json.dumps(proc.describe()))
    assert info["process"] == process and info["samplers"] == list(proc.samplers)


def test_ddpm_needs_no_data_scale_check():
    _, proc, _ = _setup("ddpm")
    assert proc.check_data_scale(10.0) is True


def test_unknown_process_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'vp' is not valid; choose one of \['ddpm', 'gamma', 'flow'\]"):
        build_process(DiffusionConfig(process="vp"))


@pytest.mark.parametrize(
    "process,sampler,steps,message",
    [
        ("ddpm", "euler", 4,
         r"sampler 'euler' is not valid for the 'ddpm' process; choose one of \['ddpm', 'ddim', 'dpmsolver\+\+'\]"),
        ("gamma", "ddim", 4, r"choose one of \['euler', 'heun'\]"),
        ("ddpm", "ddim", 0, "steps=0"),
        ("gamma", "heun", 2.5, "steps=2.5"),
        ("ddpm", "ddpm", 1001, "exceeds num_train_timesteps=1000"),
    ],
)
def test_invalid_sampler_or_steps_raise(process, sampler, steps, message):
    _, proc, _ = _setup(process)
    with pytest.raises(ValueError, match=message):
        proc.make_scheduler(sampler, steps)


def test_sample_needs_one_generator_per_sample():
    _, proc, model = _setup("ddpm")
    with pytest.raises(ValueError, match="one generator per sample"):
        proc.sample(model, torch.tensor([0, 1]), (1, 16, 16), "ddim", 2, [torch.Generator()])
    with pytest.raises(ValueError, match=r"must be \(C, \*spatial\)"):
        proc.sample(model, torch.tensor([0]), (16,), "ddim", 2, [torch.Generator()])


def test_gamma_training_noise_option_is_validated():
    message = r"training_noise='beta' is not valid; choose one of \['lognormal', 'uniform_t'\]"
    with pytest.raises(ValueError, match=message):
        GammaProcess(DiffusionConfig(process="gamma"), training_noise="beta")


@pytest.mark.parametrize("process,sampler", [("ddpm", "dpmsolver++"), ("gamma", "heun"), ("flow", "heun")])
def test_bf16_autocast_training_and_sampling(process, sampler):
    _, proc, model = _setup(process)
    x0, y = _batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = proc.training_loss(model, x0, y, torch.Generator().manual_seed(0))
        out = proc.sample(model, y, (1, 16, 16), sampler, 3, [torch.Generator().manual_seed(s) for s in range(4)])
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert out.dtype == torch.float32 and out.shape == (4, 1, 16, 16) and torch.isfinite(out).all()
