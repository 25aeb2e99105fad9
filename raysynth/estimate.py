"""How long the long work will take, from a short calibration on this machine.

Before the pipeline trains anything it times a few steps of the very networks the run will train
(the fold denoiser, and in latent space the autoencoder) and one sampling pass, in the driver
with the threads one worker gets, and scales them by the run's steps, generators, samples and the
folds that train at once. CPUs differ here by about 3x (AVX-512 against AVX2), so a measured
estimate beats a number in the README. The estimate is a rough guide: it leaves out Ray's start-up
per fit, the study and robustness (minutes on the default preset) and other load on the machine.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch

from raysynth.artifacts import mask_classes
from raysynth.config import Config
from raysynth.design import generator_fractions
from raysynth.diffusion.channels import num_channels
from raysynth.runtime import use_cpu_bf16

CALIBRATION_STEPS = 3


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seconds_per_call(fn, repeats: int = CALIBRATION_STEPS) -> float:
    fn()  # warm-up: first-call allocation and kernel selection
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def estimate_run(cfg: Config, fingerprint: dict, *, slots: int, samples_per_generator: int) -> dict:
    """Seconds for training (and the autoencoders) and sampling, with what they were scaled from.
    ``slots``: fits that run at once; ``samples_per_generator``: what sample will draw per fold."""
    from raysynth.diffusion.trainer import GeneratorFit

    d, a = cfg.diffusion, cfg.autoencoder
    n_mask = mask_classes(cfg, fingerprint)
    channels = num_channels(n_mask, int(fingerprint["shape"][0]))
    size, dims = cfg.data.image_size, cfg.data.dims
    fits = len(generator_fractions(cfg)) * cfg.cv.folds * cfg.cv.repeats
    waves = -(-fits // max(1, slots))  # fits run `slots` at a time, each on its own workers
    out: dict = {"generators": fits, "at_once": slots}
    g = torch.Generator().manual_seed(0)
    with _threads(d.cpus_per_worker), torch.random.fork_rng(devices=[]):
        if d.space == "latent":
            from raysynth.diffusion.autoencoder import AutoencoderFit, latent_side

            ae = AutoencoderFit(a, dims=dims, in_channels=channels, bf16=use_cpu_bf16(d.cpu_bf16))
            x = torch.rand((a.batch_size, channels) + (size,) * dims) * 2 - 1
            ae_step = _seconds_per_call(lambda: ae.step(x, None, generator=g))
            out["autoencoder"] = {"seconds_per_step": ae_step, "seconds": waves * a.train_steps * ae_step}
            channels, size = a.latent_channels, latent_side(size, a)
        fit = GeneratorFit(d, dims=dims, in_channels=channels, image_size=size,
                           num_classes=int(fingerprint["num_classes"]))
        x = torch.randn((d.batch_size, channels) + (size,) * dims)
        labels = torch.zeros(d.batch_size, dtype=torch.long)
        step = _seconds_per_call(lambda: fit.step(x, labels, generator=g))
        out["train"] = {"seconds_per_step": step, "seconds": waves * d.train_steps * step}
        # Sampling: one denoiser evaluation of a sampling batch, times the sampler's evaluations.
        batch = min(cfg.sampling.batch_size, max(1, samples_per_generator))
        model = fit.model.eval()
        xb, lb, tb = torch.randn((batch, channels) + (size,) * dims), torch.zeros(batch, dtype=torch.long), torch.ones(batch)
        with torch.inference_mode():
            nfe = _seconds_per_call(lambda: model(xb, tb, lb), repeats=1) / batch
        evaluations = cfg.sampling.steps * (2 if cfg.sampling.sampler == "heun" else 1) \
            * (2 if cfg.sampling.guidance_scale != 1.0 else 1)
        actors = max(1, min(cfg.sampling.max_actors, slots))
        out["sample"] = {"seconds_per_sample": nfe * evaluations,
                         "seconds": fits * samples_per_generator * nfe * evaluations / actors}
    out["seconds"] = sum(v["seconds"] for k, v in out.items() if isinstance(v, dict))
    return out


def describe(estimate: dict) -> str:
    """``estimate: about 16 min before the study: train 14 min (...), sample 2 min (...)``."""
    parts = []
    if "autoencoder" in estimate:
        e = estimate["autoencoder"]
        parts.append(f"autoencoders {_minutes(e['seconds'])} ({e['seconds_per_step']:.2f} s/step)")
    e = estimate["train"]
    parts.append(f"train {_minutes(e['seconds'])} ({estimate['generators']} generator(s), {e['seconds_per_step']:.2f} "
                 f"s/step, {estimate['at_once']} at a time)")
    e = estimate["sample"]
    parts.append(f"sample {_minutes(e['seconds'])} ({1000 * e['seconds_per_sample']:.0f} ms/sample)")
    return (f"estimate from a {CALIBRATION_STEPS}-step calibration on this machine: about "
            f"{_minutes(estimate['seconds'])} before the study: " + ", ".join(parts))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


__all__ = ["estimate_run", "describe"]
