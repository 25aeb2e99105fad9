"""The paper's gamma process as a diffusers scheduler: X_t = X + sqrt(2 * gamma * t) * eps, t in [0, 1].

A variance-exploding process with sigma(t)^2 = 2 * gamma * t, so sigma_max = sqrt(2 * gamma). The
network is wrapped in EDM's preconditioning (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1 and eq. 7) and sampled with EDM's deterministic
Algorithm 1 (Euler, or Heun's second-order correction).

Timesteps are process times t in [0, 1] (what ``add_noise`` takes). The network is conditioned on
``precondition_noise(sigma_for_t(t))`` = log(sigma) / 4, not on t itself; ``step`` takes the raw
network output F and applies ``precondition_outputs`` itself, as diffusers' ``EDMEulerScheduler`` does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

SOLVERS = ("euler", "heun")
DATA_SCALE_FACTOR = 3.0
"""sigma_max should exceed this many data standard deviations, or X_1 still shows the data."""


@dataclass
class GammaVESchedulerOutput(BaseOutput):
    """prev_sample: x at the next (lower) sigma; pred_original_sample: the denoised D(x; sigma)."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def check_data_scale(gamma: float, data_std: float, factor: float = DATA_SCALE_FACTOR) -> bool:
    """Warn (``UserWarning``) and return False if sigma_max = sqrt(2 gamma) < factor * data_std.

    Sampling starts from N(0, sigma_max^2 I), which is only close to the true X_1 = X + sigma_max * eps
    when the noise swamps the data; otherwise samples inherit a wrong mean and too little variance.
    """
    sigma_max = math.sqrt(2.0 * gamma)
    if sigma_max < factor * data_std:
        warnings.warn(
            f"gamma={gamma} gives sigma_max=sqrt(2*gamma)={sigma_max:.3g}, below {factor:g} x the data's standard "
            f"deviation ({data_std:.3g}): the process does not reach noise at t=1 and samples will be biased. "
            f"Use gamma >= {(factor * data_std) ** 2 / 2:.3g}.",
            UserWarning,
            stacklevel=2,
        )
        return False
    return True


def _expand(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) or scalar -> shape broadcastable against a (B, ...) tensor of ``ndim`` dimensions."""
    return value.reshape(value.shape + (1,) * (ndim - value.ndim)) if value.ndim else value


class GammaVEScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic EDM sampler for the variance-exploding process sigma(t) = sqrt(2 * gamma * t).

    Args:
        gamma: diffusion constant; sigma_max = sqrt(2 * gamma).
        sigma_min: the smallest non-zero sigma sampled; the last step goes from it to 0.
        sigma_data: the data's standard deviation assumed by the preconditioning (0.5 for [-1, 1]).
        solver: ``"euler"`` (N network calls for N steps) or ``"heun"`` (2N - 1 calls, EDM Algorithm 1).
        rho: spacing of the sigmas (EDM eq. 5); 7 puts more steps at low noise, 1 spaces sigma evenly.
    """

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(
        self,
        gamma: float = 1.0,
        sigma_min: float = 0.002,
        sigma_data: float = 0.5,
        solver: Literal["euler", "heun"] = "euler",
        rho: float = 7.0,
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"GammaVEScheduler: solver={solver!r} is not valid; choose one of {list(SOLVERS)}")
        if gamma <= 0 or sigma_data <= 0 or rho <= 0 or sigma_min <= 0:
            raise ValueError(
                f"GammaVEScheduler: gamma={gamma}, sigma_min={sigma_min}, sigma_data={sigma_data} and rho={rho} "
                "must all be > 0"
            )
        if sigma_min >= math.sqrt(2.0 * gamma):
            raise ValueError(
                f"GammaVEScheduler: sigma_min={sigma_min} must be below "
                f"sigma_max=sqrt(2*gamma)={math.sqrt(2 * gamma):.4g}"
            )
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[torch.Tensor] = None
        self.sigmas: Optional[torch.Tensor] = None
        self._step_index: Optional[int] = None
        self._reset_heun_state()

    @property
    def order(self) -> int:
        """Network calls per interval, as diffusers pipelines read it (2 for Heun)."""
        return 2 if self.config.solver == "heun" else 1

    # ---- the process ---------------------------------------------------------------------------
    @property
    def sigma_max(self) -> float:
        return math.sqrt(2.0 * self.config.gamma)

    @property
    def init_noise_sigma(self) -> float:
        """Sampling starts from N(0, sigma_max^2 I), the t = 1 marginal when sigma_max >> data spread."""
        return self.sigma_max

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    def sigma_for_t(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma(t) = sqrt(2 * gamma * t) (the paper's noise scale)."""
        return torch.sqrt(2.0 * self.config.gamma * torch.as_tensor(t, dtype=torch.float32))

    def t_for_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """t(sigma) = sigma^2 / (2 * gamma), the inverse of :meth:`sigma_for_t`."""
        return torch.as_tensor(sigma, dtype=torch.float32) ** 2 / (2.0 * self.config.gamma)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): x_0 + sqrt(2 * gamma * t) * noise, with timesteps t in [0, 1] of shape (B,) or scalar."""
        sigma = self.sigma_for_t(timesteps).to(device=original_samples.device, dtype=original_samples.dtype)
        return original_samples + _expand(sigma, original_samples.ndim) * noise

    # ---- EDM preconditioning (Karras et al. 2022, Table 1) ----------------------------------------
    def edm_coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) for sigma, so that D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)."""
        sd2 = self.config.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.config.sigma_data / total.sqrt(), 1.0 / total.sqrt()

    def precondition_noise(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """c_noise(sigma) = log(sigma) / 4: what the network is conditioned on."""
        return 0.25 * torch.log(torch.as_tensor(sigma, dtype=torch.float32))

    def precondition_inputs(self, sample: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """c_in(sigma) * x: unit-variance network input at every noise level."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
        return sample * _expand(self.edm_coefficients(sigma)[2], sample.ndim).to(sample.dtype)

    def precondition_outputs(
        self, sample: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor | float
    ) -> torch.Tensor:
        """D(x; sigma) = c_skip(sigma) x + c_out(sigma) F (EDM eq. 7)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
        c_skip, c_out, _ = (_expand(c, sample.ndim) for c in self.edm_coefficients(sigma))
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """c_in-scale ``sample`` for the network at the current step's sigma."""
        if self._step_index is None:
            self._init_step_index(timestep)
        return self.precondition_inputs(sample, self.sigmas[self._step_index])

    # ---- the sampler ---------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: Optional[str | torch.device] = None) -> None:
        """Set N sigma levels from sigma_max down to sigma_min, then 0, and their times t."""
        if num_inference_steps < 1:
            raise ValueError(f"GammaVEScheduler: num_inference_steps={num_inference_steps} must be >= 1")
        self.num_inference_steps = num_inference_steps
        # 1. EDM eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < N; sigma_N = 0.
        inv_rho = 1.0 / self.config.rho
        ramp = torch.linspace(0.0, 1.0, num_inference_steps, dtype=torch.float64)
        hi, lo = self.sigma_max**inv_rho, self.config.sigma_min**inv_rho
        sigmas = (hi + ramp * (lo - hi)) ** self.config.rho
        # 2. Process times of those levels, t_i = sigma_i^2 / (2 gamma) (inverse of sigma(t)^2 = 2 gamma t).
        times = sigmas**2 / (2.0 * self.config.gamma)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        # 3. Heun evaluates the network twice per interval except the last (EDM Algorithm 1, line 7):
        #    lay each inner level out twice, as diffusers' HeunDiscreteScheduler does.
        if self.config.solver == "heun":
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
            times = torch.cat([times[:1], times[1:].repeat_interleave(2)])
        self.sigmas = sigmas.to(torch.float32)  # kept on CPU: indexed by Python ints every step
        self.timesteps = times.to(dtype=torch.float32, device=device)
        self._step_index = None
        self._reset_heun_state()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: Optional[torch.Generator | list[torch.Generator]] = None,
        return_dict: bool = True,
    ) -> GammaVESchedulerOutput | tuple:
        """One deterministic step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM eq. 3).

        ``model_output`` is the raw network output F; ``generator`` is accepted for interface parity
        (the sampler draws no noise).
        """
        if self.sigmas is None:
            raise RuntimeError("GammaVEScheduler: call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        # Integrate in float32 whatever autocast gave the network, and hand back the caller's dtype.
        sample_dtype, sample = sample.dtype, sample.to(torch.float32)
        second_order = self._first_sample is not None
        # On the second (corrector) call, the current level is the target of the predictor step.
        sigma = self.sigmas[self._step_index]
        # 1. Denoise: D(x; sigma) = c_skip x + c_out F (EDM eq. 7).
        denoised = self.precondition_outputs(sample, model_output.to(torch.float32), sigma)
        # 2. ODE slope d = (x - D) / sigma (EDM Algorithm 1, lines 5 and 7).
        derivative = (sample - denoised) / sigma
        if not second_order:
            sigma_next = self.sigmas[self._step_index + 1]
            # 3. Euler step x' = x + (sigma_next - sigma) d (Algorithm 1, line 6).
            prev_sample = sample + (sigma_next - sigma) * derivative
            if self.config.solver == "heun" and sigma_next > 0:
                # Keep the predictor's slope and start for the corrector call at sigma_next.
                self._first_sample, self._first_derivative, self._dt = sample, derivative, sigma_next - sigma
        else:
            # 4. Heun correction x' = x + dt (d + d') / 2 (Algorithm 1, line 8).
            prev_sample = self._first_sample + self._dt * 0.5 * (self._first_derivative + derivative)
            self._reset_heun_state()
        self._step_index += 1
        prev_sample = prev_sample.to(sample_dtype)
        if not return_dict:
            return prev_sample, denoised
        return GammaVESchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def index_for_timestep(self, timestep: torch.Tensor | float) -> int:
        """First position of ``timestep`` in :attr:`timesteps` (the predictor call of a Heun pair)."""
        timestep = torch.as_tensor(timestep, dtype=torch.float32).to(self.timesteps.device)
        matches = torch.isclose(self.timesteps, timestep, rtol=1e-6, atol=0.0).nonzero()
        if not len(matches):
            raise ValueError(f"GammaVEScheduler: timestep {float(timestep)} is not in this schedule")
        return int(matches[0])

    def _init_step_index(self, timestep: torch.Tensor | float) -> None:
        if self.timesteps is None:
            raise RuntimeError("GammaVEScheduler: call set_timesteps before sampling")
        self._step_index = self.index_for_timestep(timestep)

    def _reset_heun_state(self) -> None:
        self._first_sample: Optional[torch.Tensor] = None
        self._first_derivative: Optional[torch.Tensor] = None
        self._dt: Optional[torch.Tensor] = None
