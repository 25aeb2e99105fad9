"""Noise processes behind one interface: Ho et al.'s DDPM, the paper's gamma (variance-exploding)
process, and rectified flow (flow matching).

A process owns everything that depends on the noise: how training corrupts data and scores the
network (``training_loss``), which samplers exist and how they are set up (``make_scheduler``), and
the sampling loop (``sample``). The network is any ``model(x, t, class_labels)``, e.g.
:class:`raysynth.diffusion.networks.Denoiser`.

Classifier-free guidance (Ho & Salimans 2022) is the processes' shared sampling loop's: a network
built with a null class (``Denoiser.null_label``) is evaluated on the label and on the null class, and
``uncond + w * (cond - uncond)`` steps the scheduler. Every process's network output is affine in
the denoised estimate given x_t, so guiding the output guides the estimate the same way.

Determinism: ``sample`` draws each sample's initial noise and every later noise with that sample's
own generator, so a sample depends only on its seed, never on its batch neighbours.
"""

from __future__ import annotations

import logging
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler)
from diffusers.training_utils import compute_snr
from diffusers.utils.torch_utils import randn_tensor

from raysynth.config import DiffusionConfig
from raysynth.diffusion.gamma import GammaVEScheduler, check_data_scale

log = logging.getLogger(__name__)

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]
"""Called as progress(done, total) after each network evaluation of a sampling run."""


class DiffusionProcess(ABC):
    name: ClassVar[str]
    samplers: ClassVar[tuple[str, ...]]

    @abstractmethod
    def training_loss(
        self, model: Model, x0: torch.Tensor, class_labels: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """x0 (B, C, *S) in [-1, 1], class_labels (B,) -> scalar loss; draws the noise levels and noise itself."""

    @abstractmethod
    def _new_scheduler(self, sampler: str) -> Any:
        """A fresh scheduler for a sampler name already checked against :attr:`samplers`."""

    @abstractmethod
    def network_timestep(self, scheduler: Any, timestep: torch.Tensor) -> torch.Tensor:
        """What the network is conditioned on at the scheduler's ``timestep`` (a 0-d tensor)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-ready description of the process for manifests."""

    def check_data_scale(self, data_std: float) -> bool:
        """Warn and return False if this process's noise cannot cover data of this standard deviation.

        DDPM's forward process is variance preserving and ends at N(0, I) whatever the data's scale,
        so the base check passes; the gamma process overrides it.
        """
        return True

    def make_scheduler(self, sampler: str, steps: int, device: Optional[str | torch.device] = None) -> Any:
        """A diffusers-interface scheduler for ``sampler`` with ``steps`` inference steps set."""
        if sampler not in self.samplers:
            raise ValueError(
                f"sampler {sampler!r} is not valid for the {self.name!r} process; choose one of {list(self.samplers)}"
            )
        self._check_steps(steps)
        scheduler = self._new_scheduler(sampler)
        scheduler.set_timesteps(steps, device=device)
        return scheduler

    @torch.inference_mode()
    def sample(
        self,
        model: Model,
        class_labels: torch.Tensor,
        shape: tuple[int, ...],
        sampler: str,
        steps: int,
        generators: list[torch.Generator],
        progress: Optional[Progress] = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Draw (B, *shape) samples clipped to [-1, 1]; shape is (C, *S), generators one per sample.

        ``guidance_scale`` w: classifier-free guidance, 1 the conditional network alone, 0 the
        unconditional one; any value but 1 needs a network with a null class. The model runs on its
        own device, as float32 unless the caller wraps this in autocast.
        """
        batch = int(class_labels.shape[0]) if class_labels.ndim == 1 else -1
        if batch < 1 or len(generators) != batch:
            raise ValueError(
                f"sample: class_labels {tuple(class_labels.shape)} must be (B,) with B >= 1, "
                f"and one generator per sample (got {len(generators)})"
            )
        if len(shape) < 2:
            raise ValueError(f"sample: shape {tuple(shape)} must be (C, *spatial)")
        device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else class_labels.device
        scheduler = self.make_scheduler(sampler, steps, device=device)
        class_labels = class_labels.to(device=device, dtype=torch.long)
        guided = _guidance(model, class_labels, float(guidance_scale))
        # 1. x_T ~ N(0, init_noise_sigma^2 I), one generator per sample (randn_tensor draws row by row).
        x = randn_tensor((batch, *shape), generator=generators, device=device, dtype=torch.float32)
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at N(0, I) and have none
        total = len(scheduler.timesteps)
        for done, t in enumerate(scheduler.timesteps, start=1):
            # 2. Network output at this level, then the scheduler's update (noise from the same generators).
            model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            output = guided(model_input, self.network_timestep(scheduler, t).to(device).expand(batch))
            x = scheduler.step(output, t, x, generator=generators).prev_sample
            if progress is not None:
                progress(done, total)
        return x.clamp(-1.0, 1.0)

    def _check_steps(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive integer")


class DDPMProcess(DiffusionProcess):
    """Ho et al. 2020 on a linear beta schedule, predicting the noise, v or x0 (``prediction_type``).

    Options: ``zero_terminal_snr`` rescales the betas so that the last step is pure noise (Lin et
    al. 2024, Alg. 1, diffusers' ``rescale_betas_zero_snr``); ``snr_gamma`` weights the loss with
    Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v, and
    min(SNR, gamma) for x0, which all equal min(SNR, gamma) on the x0 error.
    """

    name = "ddpm"
    samplers = ("ddpm", "ddim", "dpmsolver++")

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.prediction_type = cfg.prediction_type
        self.snr_gamma = cfg.snr_gamma
        # "trailing" spacing starts every sampler at t = T - 1, where x_T really is pure noise
        # (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed", Sec. 3.3).
        self.train_scheduler = DDPMScheduler(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_start=cfg.beta_start,
            beta_end=cfg.beta_end,
            beta_schedule="linear",
            prediction_type=cfg.prediction_type,
            clip_sample=True,
            clip_sample_range=1.0,
            timestep_spacing="trailing",
            rescale_betas_zero_snr=cfg.zero_terminal_snr,
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.train_scheduler.config.num_train_timesteps

    def q_sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4)."""
        return self.train_scheduler.add_noise(x0, noise, t)

    def training_loss(self, model, x0, class_labels, generator=None):
        batch = x0.shape[0]
        # 1. t ~ U{0, ..., T-1}, eps ~ N(0, I) (Ho et al. Algorithm 1, lines 3-4).
        gen_device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=gen_device)
        t = t.to(x0.device)
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        # 2. Corrupt (eq. 4) and predict the target; 3. L_simple = ||target - net(x_t, t)||^2 (eq. 14).
        out = model(self.q_sample(x0, noise, t), t, class_labels)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(x0, noise, t)
        else:
            target = x0
        if self.snr_gamma is None:
            return F.mse_loss(out.float(), target.float())
        per_sample = F.mse_loss(out.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (per_sample * self.min_snr_weights(t)).mean()

    def min_snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) Min-SNR-gamma weights for the prediction target (Hang et al. 2023, eq. 10 and Sec. 3.4)."""
        snr = compute_snr(self.train_scheduler, t)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr  # SNR > 0 here: a zero-terminal-SNR schedule needs v or x0 (config rule)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped

    def _check_steps(self, steps: int) -> None:
        super()._check_steps(steps)
        if steps > self.num_train_timesteps:
            raise ValueError(f"steps={steps} exceeds num_train_timesteps={self.num_train_timesteps}")

    def _new_scheduler(self, sampler: str) -> Any:
        config = self.train_scheduler.config
        if sampler == "ddpm":
            return DDPMScheduler.from_config(config)
        if sampler == "ddim":
            return DDIMScheduler.from_config(config)  # eta = 0 is step()'s default: deterministic
        # dpmsolver++: clip-like dynamic thresholding with max 1 keeps x0 predictions in [-1, 1],
        # as clip_sample does for DDPM/DDIM (Lu et al. 2022, DPM-Solver++, Sec. 4). The two differ:
        # DDIM clips x0 and keeps the network's epsilon, DPM-Solver++ steps on the clipped x0
        # alone. Our small generators need the clip (unclipped DDIM and unthresholded DPM-Solver++
        # both saturate to +-1), and only DDIM's form of it keeps sample brightness (BENCHMARKS.md).
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, thresholding=True, sample_max_value=1.0
        )

    def network_timestep(self, scheduler, timestep):
        return timestep.to(torch.long)

    def describe(self) -> dict[str, Any]:
        c = self.train_scheduler.config
        return {
            "process": self.name,
            "reference": "Ho et al. 2020, Denoising Diffusion Probabilistic Models",
            "prediction": self.prediction_type,
            "beta_schedule": "linear",
            "zero_terminal_snr": bool(c.rescale_betas_zero_snr),
            "snr_gamma": self.snr_gamma,
            "beta_start": c.beta_start,
            "beta_end": c.beta_end,
            "num_train_timesteps": c.num_train_timesteps,
            "timestep_spacing": c.timestep_spacing,
            "samplers": list(self.samplers),
        }


class GammaProcess(DiffusionProcess):
    """The paper's X_t = X + sqrt(2 gamma t) eps with EDM preconditioning and Euler/Heun sampling.

    Training noise levels (``training_noise``):
      * ``"lognormal"`` (default): ln sigma ~ N(-1.2, 1.2^2) truncated to [sigma_min, sigma_max]
        (EDM Table 1, P_mean/P_std). The process fixes the marginals, not which noise levels the loss
        emphasises; t ~ U(0, 1] means sigma^2 ~ U(0, 2 gamma), which spends almost all training on
        noise far above the data scale (P(sigma < sigma_max / 10) = 1%) where D is nearly the mean,
        and it changes with gamma. EDM's log-normal centres training on sigma ~ 0.3, where the
        loss can still fall (EDM Sec. 5, Fig. 5a), for every gamma, so gammas differ only in sigma_max.
        Truncating (inverse CDF) rather than clipping avoids point masses at the ends.
      * ``"uniform_t"``: the paper's literal t ~ U(0, 1], floored at t(sigma_min).
    """

    name = "gamma"
    samplers = ("euler", "heun")
    P_MEAN, P_STD = -1.2, 1.2
    TRAINING_NOISE = ("lognormal", "uniform_t")

    def __init__(self, cfg: DiffusionConfig, *, sigma_data: float = 0.5, training_noise: str = "lognormal") -> None:
        if training_noise not in self.TRAINING_NOISE:
            raise ValueError(
                f"training_noise={training_noise!r} is not valid; choose one of {list(self.TRAINING_NOISE)}"
            )
        self.training_noise = training_noise
        # Built now so that a bad gamma/sigma_min fails at construction, not mid-training.
        self.scheduler = GammaVEScheduler(gamma=cfg.gamma, sigma_min=cfg.sigma_min, sigma_data=sigma_data)
        self._scale_checked = False

    @property
    def sigma_max(self) -> float:
        return self.scheduler.sigma_max

    def check_data_scale(self, data_std: float) -> bool:
        """Warn if sigma_max = sqrt(2 gamma) < 3 data standard deviations (see gamma.check_data_scale).

        Call it with the whole training set's std; otherwise ``training_loss`` checks its first batch.
        """
        self._scale_checked = True
        return check_data_scale(self.scheduler.config.gamma, data_std)

    def sample_training_t(self, batch: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
        """(B,) process times t in (0, 1] drawn per ``training_noise``."""
        gen_device = generator.device if generator is not None else device
        u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64).to(device)
        s_min, s_max = self.scheduler.config.sigma_min, self.sigma_max
        if self.training_noise == "uniform_t":
            t_min = s_min**2 / (2.0 * self.scheduler.config.gamma)
            return (t_min + u * (1.0 - t_min)).float()
        # Inverse-CDF draw of ln sigma ~ N(P_MEAN, P_STD^2) restricted to [ln s_min, ln s_max].
        lo, hi = (_normal_cdf((math.log(s) - self.P_MEAN) / self.P_STD) for s in (s_min, s_max))
        z = torch.special.ndtri((lo + u * (hi - lo)).clamp(1e-12, 1 - 1e-12))
        sigma = torch.exp(self.P_MEAN + self.P_STD * z).clamp(s_min, s_max)
        return self.scheduler.t_for_sigma(sigma).to(device)

    def training_loss(self, model, x0, class_labels, generator=None):
        if not self._scale_checked:
            # Once per process object, unless the caller already checked the whole data set.
            self.check_data_scale(float(x0.detach().float().std()))
        sch = self.scheduler
        # 1. t per sample, sigma(t) = sqrt(2 gamma t), x_t = x + sigma eps (the paper's process).
        t = self.sample_training_t(x0.shape[0], generator, x0.device)
        sigma = sch.sigma_for_t(t).to(x0.device)
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = sch.add_noise(x0, noise, t)
        # 2. EDM eq. 7: the network F sees c_in x_t and c_noise = ln(sigma) / 4.
        c_skip, c_out, c_in = (c.reshape(-1, *([1] * (x0.ndim - 1))) for c in sch.edm_coefficients(sigma))
        out = model(x_t * c_in, sch.precondition_noise(sigma), class_labels)
        # 3. EDM eq. 8: lambda(sigma) ||D - x||^2 with lambda = 1 / c_out^2 equals ||F - (x - c_skip x_t) / c_out||^2.
        target = (x0 - c_skip * x_t) / c_out
        return F.mse_loss(out.float(), target.float())

    def _new_scheduler(self, sampler: str) -> GammaVEScheduler:
        return GammaVEScheduler.from_config(self.scheduler.config, solver=sampler)

    def network_timestep(self, scheduler, timestep):
        return scheduler.precondition_noise(scheduler.sigma_for_t(timestep))

    def describe(self) -> dict[str, Any]:
        c = self.scheduler.config
        return {
            "process": self.name,
            "reference": "X_t = X + sqrt(2*gamma*t)*eps; EDM preconditioning and samplers (Karras et al. 2022)",
            "gamma": c.gamma,
            "sigma_min": c.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": c.sigma_data,
            "rho": c.rho,
            "training_noise": self.training_noise,
            **({"p_mean": self.P_MEAN, "p_std": self.P_STD} if self.training_noise == "lognormal" else {}),
            "samplers": list(self.samplers),
        }


class FlowProcess(DiffusionProcess):
    """Rectified flow (Liu et al. 2023; flow matching, Lipman et al. 2023) with diffusers' flow schedulers.

    x_s = (1 - s) x0 + s eps for s in [0, 1]; the network predicts the velocity v = eps - x0 and is
    conditioned on s * num_train_timesteps, the timestep diffusers' ``FlowMatch*`` schedulers pass.
    Sampling integrates dx/ds = v from s = 1 (noise) to 0 with Euler (one evaluation per step) or
    Heun (two per step, but the last). Training times (``flow_timesteps``): s = sigmoid(z),
    z ~ N(0, 1) (Esser et al. 2024, SD3's logit-normal, which favours the middle where the velocity
    is hardest to predict), or s ~ U(0, 1) as in Liu et al.
    """

    name = "flow"
    samplers = ("euler", "heun")

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.timesteps = cfg.flow_timesteps
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0)

    def sample_training_s(self, batch: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
        """(B,) flow times s in (0, 1) drawn per ``flow_timesteps``."""
        gen_device = generator.device if generator is not None else device
        if self.timesteps == "uniform":
            s = torch.rand(batch, generator=generator, device=gen_device)
        else:
            s = torch.sigmoid(torch.randn(batch, generator=generator, device=gen_device))
        return s.to(device)

    def training_loss(self, model, x0, class_labels, generator=None):
        # 1. s per sample, eps ~ N(0, I); 2. x_s on the straight line; 3. ||v - v_theta(x_s, s)||^2.
        s = self.sample_training_s(x0.shape[0], generator, x0.device)
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        s_ = s.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        x_s = (1.0 - s_) * x0 + s_ * noise
        out = model(x_s, s * self.num_train_timesteps, class_labels)
        return F.mse_loss(out.float(), (noise - x0).float())

    def _new_scheduler(self, sampler: str) -> Any:
        cls = FlowMatchEulerDiscreteScheduler if sampler == "euler" else FlowMatchHeunDiscreteScheduler
        return cls(num_train_timesteps=self.num_train_timesteps, shift=1.0)

    def network_timestep(self, scheduler, timestep):
        return timestep.to(torch.float32)  # s * num_train_timesteps, as in training

    def describe(self) -> dict[str, Any]:
        return {
            "process": self.name,
            "reference": "Liu et al. 2023, Flow Straight and Fast (rectified flow); diffusers FlowMatch schedulers",
            "prediction": "velocity eps - x0",
            "training_timesteps": self.timesteps,
            "num_train_timesteps": self.num_train_timesteps,
            "samplers": list(self.samplers),
        }


PROCESSES: dict[str, type[DiffusionProcess]] = {"ddpm": DDPMProcess, "gamma": GammaProcess, "flow": FlowProcess}


def build_process(cfg: DiffusionConfig) -> DiffusionProcess:
    """The noise process ``cfg.process`` names, configured from ``cfg``."""
    if cfg.process not in PROCESSES:
        raise ValueError(f"diffusion.process: {cfg.process!r} is not valid; choose one of {list(PROCESSES)}")
    if cfg.process != "ddpm":
        ddpm_only = {"prediction_type": "epsilon", "zero_terminal_snr": False, "snr_gamma": None}
        ignored = [k for k, default in ddpm_only.items() if getattr(cfg, k) != default]
        if ignored:
            log.warning("diffusion.%s applies to the ddpm process only; the %s process ignores it",
                        "/".join(ignored), cfg.process)
    return PROCESSES[cfg.process](cfg)


def _guidance(model: Model, labels: torch.Tensor, scale: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(x, t)``: the network on ``labels``, guided by its null class when ``scale`` is not 1."""
    if scale == 1.0:
        return lambda x, t: model(x, t, labels)
    null = getattr(model, "null_label", None)
    if null is None:
        raise ValueError(f"sampling.guidance_scale={scale:g} needs a generator trained with a null class "
                         "(diffusion.class_dropout > 0); this one has none")
    unconditional = torch.full_like(labels, int(null))
    if scale == 0.0:
        return lambda x, t: model(x, t, unconditional)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, unconditional])).chunk(2)
        return uncond + scale * (cond - uncond)

    return guided


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))
