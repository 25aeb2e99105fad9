"""One trial of ``raysynth tune``: a short generator fit, scored by the FD of its samples.

Runs in Ray Tune workers (imports library modules only). Losses at different gammas live on
different noise scales, so a trial reports the Fréchet distance of its class-conditional samples
to held-out real images every ``eval_every`` steps, which ASHA compares.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import ray.tune as tune
import torch

from raysynth.config import DiffusionConfig, from_dict
from raysynth.diffusion.channels import decode_joint
from raysynth.diffusion.trainer import GeneratorFit
from raysynth.quality.metrics import frechet_distance, kid
from raysynth.runtime import derive_seed, set_threads

COVARIANCE = "ledoit_wolf"  # validation sets are often smaller than the feature width
KID_SUBSETS = 20
SEED_INIT, SEED_BATCH, SEED_EVAL = 102, 103, 104


def trial_diffusion(base: DiffusionConfig, trial: dict[str, Any]) -> DiffusionConfig:
    """The base diffusion config with a trial's process, learning rate and (gamma process only) gamma."""
    gamma = float(trial["gamma"]) if trial["process"] == "gamma" else base.gamma
    return base.replace(process=trial["process"], learning_rate=float(trial["learning_rate"]), gamma=gamma)


def sample_quality(model, process, *, sampler: str, steps: int, labels: np.ndarray, seeds: list[int],
                   shape: tuple[int, ...], num_mask_classes: int, encoder, real_features: np.ndarray,
                   batch_size: int = 64, kid_seed: int = 0) -> dict[str, Any]:
    """Sample one image per (label, seed), embed the image channel, compare with ``real_features (n, F)``.

    Returns ``{"fd", "kid", "seconds", "finite"}``; a run that produced NaN (a diverged network)
    gives ``finite=False`` and NaN metrics instead of raising.
    """
    device = next(model.parameters()).device
    t0, images = time.perf_counter(), []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        gens = [torch.Generator(device=device).manual_seed(int(seed)) for seed in chunk]
        y = torch.as_tensor(labels[start:start + len(chunk)], dtype=torch.long, device=device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = process.sample(model, y, shape, sampler, steps, gens)
        images.append(decode_joint(x.float().cpu(), num_mask_classes, shape[0] - num_mask_classes)[0].numpy())
    seconds = time.perf_counter() - t0
    images = np.concatenate(images)
    if not np.all(np.isfinite(images)):
        return {"fd": float("nan"), "kid": float("nan"), "seconds": seconds, "finite": False}
    fake = encoder.features(images)
    return {"fd": frechet_distance(real_features, fake, covariance=COVARIANCE),
            "kid": kid(real_features, fake, subsets=KID_SUBSETS, seed=kid_seed)[0], "seconds": seconds, "finite": True}


def tune_trial(config: dict[str, Any], data: dict[str, Any]) -> None:
    """One Tune trial: train a short generator, report FD every ``eval_every`` steps.

    ``data`` (from the object store): ``cfg``, ``settings``, ``x0 (N, C, *S)``, ``labels (N,)``,
    ``encoder``, ``val_features (n, F)``, ``eval_labels (M,)``, ``num_classes``, ``num_mask_classes``.
    """
    cfg, s = from_dict(data["cfg"]), data["settings"]
    set_threads(s["cpus_per_trial"])
    device = torch.device("cuda" if s["gpus_per_trial"] > 0 and torch.cuda.is_available() else "cpu")
    diffusion = trial_diffusion(cfg.diffusion, config)
    x0, labels = torch.from_numpy(data["x0"]).to(device), torch.from_numpy(data["labels"]).to(device)
    # Common random numbers: every trial starts from the same weights, sees the same batches and
    # samples from the same noise, so FD differences come from the hyperparameters, not the draws.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, SEED_INIT))
        fit = GeneratorFit(diffusion, dims=cfg.data.dims, in_channels=x0.shape[1], image_size=cfg.data.image_size,
                           num_classes=data["num_classes"], device=device)
    covers = fit.process.check_data_scale(float(x0.std()))
    sampler = s[f"{diffusion.process}_sampler"]
    eval_seeds = [derive_seed(cfg.seed, SEED_EVAL, j) % 2**63 for j in range(len(data["eval_labels"]))]
    best, loss_ema, t0 = float("inf"), None, time.perf_counter()
    for step in range(s["trial_steps"]):
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, SEED_BATCH, step))
        idx = torch.randint(0, x0.shape[0], (diffusion.batch_size,), generator=g).to(device)
        loss = fit.step(x0[idx], labels[idx], generator=g)
        loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
        done = step + 1
        if done % s["eval_every"] and done != s["trial_steps"] and math.isfinite(loss):
            continue
        q = {"fd": float("nan"), "kid": float("nan"), "finite": False}
        if math.isfinite(loss):
            with fit.ema_weights() as model:
                model.eval()
                q = sample_quality(model, fit.process, sampler=sampler, steps=s["eval_steps"], labels=data["eval_labels"],
                                   seeds=eval_seeds, shape=tuple(x0.shape[1:]), num_mask_classes=data["num_mask_classes"],
                                   encoder=data["encoder"], real_features=data["val_features"],
                                   batch_size=cfg.sampling.batch_size, kid_seed=cfg.seed)
                model.train()
        best = min(best, q["fd"]) if q["finite"] else best
        tune.report({"fd": q["fd"], "kid": q["kid"], "step": done, "best_fd": best, "loss": loss_ema,
                     "diverged": not q["finite"], "sigma_max_covers_data": covers,
                     "seconds": time.perf_counter() - t0})
        if not q["finite"]:
            return  # a diverged network does not recover; free the slot for the next trial
