"""Stage ``train``: fit one class-conditional generator per CV fold with Ray Train.

Leakage rule: the generator of fold k trains on fold k's real *training* part only, so its
samples can be added to that fold's training set without it ever having seen the test part.
The ids it trained on are written to ``OUT/ddpm/fold_k/train_ids.json`` and checked disjoint.

For a scarcity curve (``study.real_fractions``) each smaller fraction p gets its own generator,
``OUT/ddpm/fold_k_p25`` for p = 0.25, trained only on that fraction's nested subset of the
fold's training part (``prepared/subsets.json``); its ``train_ids.json`` records the fraction.

Shape: ``train_loop_per_worker(config)`` -> ``ScalingConfig`` -> ``TorchTrainer``. Every rank
reports at the same steps; rank 0 attaches the checkpoint (EMA weights, training state and the
loss history). Re-running with the same output folder resumes from the last checkpoint: Ray
Train restores the run from ``OUT/ray/ddpm_fold_k`` and the loop continues at the saved step.

Progress: rank 0 of every fit posts its step and loss about once a second to one small actor
(:class:`raysynth.console.ProgressBoard`); a driver thread polls it into one bar over all folds,
which stays readable however many folds train at once.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

from raysynth.artifacts import (
    CHECKPOINT_DIR,
    GENERATOR_META,
    LOSS_HISTORY,
    TRAIN_IDS,
    Layout,
    fraction_tag,
    generator_complete,
    generator_digest,
    mask_classes,
    read_autoencoder,
    read_prepared,
)
from raysynth.config import Config, from_dict
from raysynth.design import generator_fractions
from raysynth.diffusion.fits import copy_export, fold_jobs, fold_slots, ray_train_fit, run_fits
from raysynth.diffusion.trainer import GeneratorFit
from raysynth.diffusion.worker import train_loop_per_worker
from raysynth.io import read_json, write_json, write_text
from raysynth.runtime import ensure_ray

log = logging.getLogger(__name__)


def train_generators(
    cfg: Config, layout: Layout, folds: Optional[list[int]] = None, force: bool = False
) -> list[dict[str, Any]]:
    """Train (or resume, or skip) the generator of every requested fold and real fraction
    (``design.generator_fractions``). Returns their metadata."""
    records, fingerprint, splits = read_prepared(layout, cfg)
    jobs = fold_jobs(cfg, layout, records, splits, folds, force, what="train", folder=layout.ddpm,
                     complete=generator_complete, run_name=run_name)
    for job in jobs:  # latent space: the fold's own autoencoder, checked before any worker starts
        if cfg.diffusion.space == "latent":
            ae = read_autoencoder(layout, cfg, job["fold"], job["fraction"])
            job["autoencoder"] = {"path": ae["path"], "scale_factor": ae["scale_factor"], "digest": ae["digest"],
                                  "latent_shape": ae["latent_shape"]}
    if jobs:
        ensure_ray(cfg)
        run_fits(cfg, str(layout.root), jobs, _fit_fold, fingerprint, what="train", steps=cfg.diffusion.train_steps)
    wanted = [f["fold"] for f in splits if folds is None or f["fold"] in folds]
    return [read_json(layout.ddpm(k, p) / GENERATOR_META) for k in wanted for p in generator_fractions(cfg)]


def run_name(fold: int, fraction: float = 1.0) -> str:
    return f"ddpm_fold_{fold}{fraction_tag(fraction)}"


def _fit_fold(cfg_dict: dict, root: str, job: dict, fingerprint: dict) -> None:
    """Fit one generator; ``job``: fold, fraction, name, train_ids, test_ids, subset_size (and
    ``autoencoder`` in latent space)."""
    cfg = from_dict(cfg_dict)
    layout = Layout.at(root)
    fold, fraction, name, train_ids, test_ids = job["fold"], job["fraction"], job["name"], job["train_ids"], job["test_ids"]
    t0 = time.time()
    log.debug("train: fold %s: %d real training images, %d steps", name, len(train_ids), cfg.diffusion.train_steps)
    result = ray_train_fit(cfg, train_loop_per_worker, {
        "cfg": cfg_dict,
        "fold": fold,
        "name": name,
        "data_path": str(layout.data_parquet),
        "train_ids": train_ids,
        "num_classes": int(fingerprint["num_classes"]),
        "num_mask_classes": mask_classes(cfg, fingerprint),
        "progress": job.get("progress"),
        "autoencoder": job.get("autoencoder"),
    }, run_name=run_name(fold, fraction), storage=layout.ray_storage)
    out = layout.ddpm(fold, fraction)
    history, state_step = copy_export(result, GeneratorFit.EXPORT, out, CHECKPOINT_DIR)
    write_text(out / LOSS_HISTORY, "".join(json.dumps(row) + "\n" for row in history))
    write_json(out / TRAIN_IDS, {"fold": fold, "fraction": fraction, "real_subset_size": job["subset_size"],
                                 "train_ids": train_ids, "test_ids": test_ids,
                                 "disjoint": not (set(train_ids) & set(test_ids))})
    ae = job.get("autoencoder")
    # Written last: its presence with a matching digest marks the fold complete.
    write_json(out / GENERATOR_META, {
        "generator_id": f"ddpm-fold{name}-{generator_digest(cfg)}",
        "fold": fold,
        "fraction": fraction,
        "digest": generator_digest(cfg, fraction),
        "process": cfg.diffusion.process,
        "diffusion": cfg_dict["diffusion"],
        "space": cfg.diffusion.space,
        # Latent space: the autoencoder whose scaled latents the denoiser learned (its folder, digest
        # and scale factor); the sampler decodes with it.
        "autoencoder": None if ae is None else {"fold": fold, "fraction": fraction, **ae},
        "num_classes": int(fingerprint["num_classes"]),
        "class_names": fingerprint["class_names"],
        "num_mask_classes": mask_classes(cfg, fingerprint),
        "num_channels": int(fingerprint["shape"][0]),  # image channels (C of [C, *spatial]); masks come after
        "channels": fingerprint.get("channels"),
        "dims": cfg.data.dims,
        "image_size": cfg.data.image_size,
        "spacing": fingerprint.get("spacing"),
        "num_train_images": len(train_ids),
        "steps": state_step,
        "final_loss": history[-1]["loss_ema"] if history else None,
        "train_seconds": round(time.time() - t0, 1),
    })
    log.debug("train: fold %s done in %.0fs (final loss %.4f)", name, time.time() - t0,
              history[-1]["loss_ema"] if history else float("nan"))


__all__ = ["train_generators", "fold_jobs", "fold_slots", "run_name"]
