"""Objectives and guidance (issue 16): prediction targets, zero-terminal SNR, Min-SNR weights, the
flow process, classifier-free guidance and label dropout, checked against exact oracles."""

from __future__ import annotations

import pytest
import torch

from raysynth.config import ConfigError, DiffusionConfig, load_config
from raysynth.diffusion.networks import Denoiser, build_denoiser
from raysynth.diffusion.process import build_process
from raysynth.diffusion.trainer import drop_labels

SHAPE = (1, 8, 8)


def _point(seed: int = 0) -> torch.Tensor:
    """The one image of a point-mass data set, (1, *SHAPE) in [-0.8, 0.8]."""
    return (torch.rand((1, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8)


class DDPMOracle(torch.nn.Module):
    """The exact network for data that is the single image ``c``: at (x_t, t) it knows x0 = c (+ delta),
    hence eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), and returns the process's target."""

    def __init__(self, process, c: torch.Tensor, delta: float = 0.0):
        super().__init__()
        self.process, self.c, self.delta = process, c, delta
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the oracle a device

    def forward(self, x, t, y):
        abar = self.process.train_scheduler.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
        x0 = self.c + self.delta
        eps = (x - abar.sqrt() * x0) / (1 - abar).clamp_min(1e-12).sqrt()
        kind = self.process.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            return abar.sqrt() * eps - (1 - abar).sqrt() * x0
        return x0.expand_as(x)


class FlowOracle(torch.nn.Module):
    """The exact velocity for point-mass data ``c``: x_s = (1 - s) c + s eps gives v = (x_s - c) / s."""

    def __init__(self, c: torch.Tensor, num_train_timesteps: int = 1000):
        super().__init__()
        self.c, self.T = c, num_train_timesteps
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        s = (t.float() / self.T).reshape(-1, 1, 1, 1)
        return (x - self.c) / s


def _gens(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


@pytest.mark.parametrize("kind,ztsnr", [("epsilon", False), ("v_prediction", False), ("sample", False),
                                        ("v_prediction", True), ("sample", True)])
def test_ddpm_oracle_has_zero_loss_and_samples_its_point(kind, ztsnr):
    """The loss's target is the one each prediction type defines: the exact network scores 0; and
    the sampler, given it, returns the data point."""
    proc = build_process(DiffusionConfig(prediction_type=kind, zero_terminal_snr=ztsnr))
    c = _point()
    oracle = DDPMOracle(proc, c)
    x0 = c.expand(6, *SHAPE)
    assert float(proc.training_loss(oracle, x0, torch.zeros(6, dtype=torch.long), torch.Generator().manual_seed(0))) < 1e-8
    out = proc.sample(oracle, torch.zeros(3, dtype=torch.long), SHAPE, "ddim", 10, _gens(3))
    torch.testing.assert_close(out, c.expand(3, *SHAPE), atol=2e-4, rtol=0)


def test_zero_terminal_snr_ends_at_pure_noise():
    plain = build_process(DiffusionConfig(prediction_type="v_prediction"))
    rescaled = build_process(DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True))
    assert float(plain.train_scheduler.alphas_cumprod[-1]) > 1e-5  # the flawed schedule: x_T keeps signal
    assert float(rescaled.train_scheduler.alphas_cumprod[-1]) < 1e-6
    assert rescaled.describe()["zero_terminal_snr"] is True and plain.describe()["zero_terminal_snr"] is False


def test_min_snr_weights_give_the_same_loss_on_the_x0_error_for_every_target():
    """Hang et al.: with the weights min(SNR, g)/SNR (eps), min(SNR, g)/(SNR + 1) (v) and min(SNR, g)
    (x0), an x0 error delta costs min(SNR, g) * delta^2 whatever the network predicts."""
    c, delta, losses = _point(), 0.05, {}
    x0 = c.expand(16, *SHAPE)
    labels = torch.zeros(16, dtype=torch.long)
    for kind in ("epsilon", "v_prediction", "sample"):
        proc = build_process(DiffusionConfig(prediction_type=kind, snr_gamma=5.0))
        losses[kind] = float(proc.training_loss(DDPMOracle(proc, c, delta), x0, labels, torch.Generator().manual_seed(3)))
        t = torch.randint(0, proc.num_train_timesteps, (16,), generator=torch.Generator().manual_seed(3))
        abar = proc.train_scheduler.alphas_cumprod[t]
        expected = float((torch.clamp(abar / (1 - abar), max=5.0) * delta**2).mean())
        assert losses[kind] == pytest.approx(expected, rel=1e-3), kind
    # and unweighted, the three differ (the weights are what makes them agree)
    raw = [float(build_process(DiffusionConfig(prediction_type=k)).training_loss(
        DDPMOracle(build_process(DiffusionConfig(prediction_type=k)), c, delta), x0, labels,
        torch.Generator().manual_seed(3))) for k in ("epsilon", "sample")]
    assert raw[1] == pytest.approx(delta**2, rel=1e-4) and raw[0] > 2 * raw[1]  # eps: mean SNR * delta^2


@pytest.mark.parametrize("sampler,steps", [("euler", 4), ("heun", 3)])
def test_flow_oracle_has_zero_loss_and_integrates_to_its_point(sampler, steps):
    proc = build_process(DiffusionConfig(process="flow"))
    c = _point(1)
    oracle = FlowOracle(c)
    x0 = c.expand(6, *SHAPE)
    assert float(proc.training_loss(oracle, x0, torch.zeros(6, dtype=torch.long), torch.Generator().manual_seed(0))) < 1e-8
    out = proc.sample(oracle, torch.zeros(2, dtype=torch.long), SHAPE, sampler, steps, _gens(2))
    torch.testing.assert_close(out, c.expand(2, *SHAPE), atol=1e-4, rtol=0)


@pytest.mark.parametrize("timesteps", ["logit_normal", "uniform"])
def test_flow_training_times_lie_in_the_open_interval(timesteps):
    proc = build_process(DiffusionConfig(process="flow", flow_timesteps=timesteps))
    s = proc.sample_training_s(4000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert 0 < float(s.min()) and float(s.max()) < 1
    # logit-normal concentrates on the middle; uniform does not
    middle = float(((s > 0.25) & (s < 0.75)).float().mean())
    assert middle == pytest.approx(0.5, abs=0.03) if timesteps == "uniform" else middle > 0.6


class Linear(torch.nn.Module):
    """out = x * (1 + label): a network whose conditional and null outputs differ, with a null class."""

    def __init__(self, null_label=2):
        super().__init__()
        self.null_label = null_label
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        return x * (1.0 + y.float()).reshape(-1, 1, 1, 1) * 0.1


def test_guidance_combines_conditional_and_null_outputs():
    proc = build_process(DiffusionConfig())
    model, labels, w = Linear(), torch.tensor([0, 1]), 3.0

    def by_hand(x, t, y):
        null = model(x, t, torch.full_like(y, 2))
        return null + w * (model(x, t, y) - null)

    hand = Linear(None)
    hand.forward = by_hand
    guided = proc.sample(model, labels, SHAPE, "ddim", 5, _gens(2), guidance_scale=w)
    torch.testing.assert_close(guided, proc.sample(hand, labels, SHAPE, "ddim", 5, _gens(2)))
    uncond = proc.sample(model, labels, SHAPE, "ddim", 5, _gens(2), guidance_scale=0.0)
    torch.testing.assert_close(uncond, proc.sample(model, torch.tensor([2, 2]), SHAPE, "ddim", 5, _gens(2)))
    assert not torch.allclose(guided, proc.sample(model, labels, SHAPE, "ddim", 5, _gens(2)))


def test_guidance_without_a_null_class_is_refused():
    proc = build_process(DiffusionConfig())
    model = build_denoiser(DiffusionConfig(channels=[8]), dims=2, in_channels=1, image_size=8, num_classes=2)
    assert model.null_label is None
    with pytest.raises(ValueError, match=r"sampling.guidance_scale=2 needs a generator trained with a null class"):
        proc.sample(model, torch.tensor([0]), SHAPE, "ddim", 2, _gens(1), guidance_scale=2.0)


def test_null_class_is_one_more_embedding_and_survives_saving(tmp_path):
    cfg = DiffusionConfig(channels=[8], class_dropout=0.1)
    model = build_denoiser(cfg, dims=2, in_channels=1, image_size=8, num_classes=3)
    assert model.null_label == 3 and model.unet.class_embedding.num_embeddings == 4
    model(torch.zeros(1, *SHAPE), torch.tensor([5]), torch.tensor([3]))  # the null label is a valid input
    model.save_pretrained(tmp_path / "g")
    back = Denoiser.from_pretrained(tmp_path / "g")
    assert back.null_label == 3 and back.config["null_class"] is True
    plain = build_denoiser(DiffusionConfig(channels=[8]), dims=2, in_channels=1, image_size=8, num_classes=3)
    assert plain.unet.class_embedding.num_embeddings == 3


def test_drop_labels_replaces_about_p_of_them():
    labels = torch.arange(20000) % 3
    dropped = drop_labels(labels, 0.2, 3, torch.Generator().manual_seed(0))
    null = dropped == 3
    assert float(null.float().mean()) == pytest.approx(0.2, abs=0.01)
    assert torch.equal(dropped[~null], labels[~null])
    assert torch.equal(drop_labels(labels, 0.0, 3, torch.Generator().manual_seed(0)), labels)


@pytest.mark.parametrize("overrides, message", [
    (["diffusion.zero_terminal_snr=true"], "diffusion.zero_terminal_snr: needs prediction_type v_prediction or sample"),
    (["sampling.guidance_scale=2"], "sampling.guidance_scale: 2.0 needs a generator that knows the null class"),
    (["diffusion.class_dropout=1"], "diffusion.class_dropout"),
    (["diffusion.prediction_type=x0"], "diffusion.prediction_type"),
    (["diffusion.process=flow", "sampling.sampler=ddim"], "sampling.sampler: 'ddim' does not fit diffusion.process='flow'"),
])
def test_bad_objective_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_config("smoke", None, overrides)
    assert "\n" not in str(info.value)


def test_new_fields_at_their_defaults_keep_old_digests():
    """Artifacts made before these options existed stay current: defaults leave the digests alone."""
    cfg = load_config("smoke")
    on = load_config("smoke", None, ["diffusion.prediction_type=v_prediction"])
    off = load_config("smoke", None, ["diffusion.prediction_type=epsilon"])
    assert cfg.section_digest("diffusion") == off.section_digest("diffusion") != on.section_digest("diffusion")
    plain = cfg.to_dict()["diffusion"]
    assert {"prediction_type", "zero_terminal_snr", "snr_gamma", "class_dropout"} <= set(plain)
