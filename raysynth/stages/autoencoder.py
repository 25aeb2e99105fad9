"""Stage ``autoencoder`` (latent space only): fit one autoencoder per CV fold and real fraction.

Leakage rule, as for the generators: the autoencoder of fold k trains on the same real ids as
fold k's generator (its training part, or a fraction's subset, capped by
``diffusion.max_train_images``) and never sees the test part; ``train_ids.json`` records both,
and the ``train`` stage refuses an autoencoder of another fold or config
(:func:`raysynth.artifacts.read_autoencoder`).

``OUT/autoencoder/fold_k/``: ``checkpoint/`` (the network), ``metrics.jsonl``, ``train_ids.json``,
and ``autoencoder.json``, written last: fold, fraction, digest, the scale factor (1 / std of the
fold's training latents) and the latent shape. With ``diffusion.space=pixel`` the stage does nothing.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional

from raysynth.artifacts import (
    AUTOENCODER_META,
    CHECKPOINT_DIR,
    LOSS_HISTORY,
    TRAIN_IDS,
    Layout,
    autoencoder_complete,
    autoencoder_digest,
    fraction_tag,
    mask_classes,
    read_prepared,
)
from raysynth.config import Config, from_dict
from raysynth.data.schema import read_parquet
from raysynth.design import generator_fractions
from raysynth.diffusion.autoencoder import AutoencoderFit, decode, encode, latent_side, load_autoencoder, scale_factor
from raysynth.diffusion.fits import copy_export, fold_jobs, ray_train_fit, run_fits
from raysynth.diffusion.trainer import training_tensors
from raysynth.diffusion.worker import autoencoder_loop_per_worker
from raysynth.io import read_json, write_json, write_text
from raysynth.runtime import ensure_ray, set_threads

log = logging.getLogger(__name__)


def train_autoencoders(cfg: Config, layout: Layout, folds: Optional[list[int]] = None,
                       force: bool = False) -> list[dict[str, Any]]:
    """Train (or resume, or skip) the autoencoder of every requested fold and real fraction.
    Returns their metadata; nothing in pixel space."""
    if cfg.diffusion.space != "latent":
        log.info("autoencoder: diffusion.space is pixel; nothing to do")
        return []
    records, fingerprint, splits = read_prepared(layout, cfg)
    jobs = fold_jobs(cfg, layout, records, splits, folds, force, what="autoencoder", folder=layout.autoencoder,
                     complete=autoencoder_complete, run_name=run_name)
    if jobs:
        ensure_ray(cfg)
        run_fits(cfg, str(layout.root), jobs, _fit_fold, fingerprint, what="autoencoder",
                 steps=cfg.autoencoder.train_steps)
    wanted = [f["fold"] for f in splits if folds is None or f["fold"] in folds]
    return [read_json(layout.autoencoder(k, p) / AUTOENCODER_META) for k in wanted for p in generator_fractions(cfg)]


def run_name(fold: int, fraction: float = 1.0) -> str:
    return f"autoencoder_fold_{fold}{fraction_tag(fraction)}"


def _fit_fold(cfg_dict: dict, root: str, job: dict, fingerprint: dict) -> None:
    """Fit one autoencoder, then measure its training latents' scale."""
    cfg = from_dict(cfg_dict)
    layout = Layout.at(root)
    fold, fraction, name, train_ids, test_ids = job["fold"], job["fraction"], job["name"], job["train_ids"], job["test_ids"]
    n_mask = mask_classes(cfg, fingerprint)
    t0 = time.time()
    result = ray_train_fit(cfg, autoencoder_loop_per_worker, {
        "cfg": cfg_dict, "fold": fold, "name": name, "data_path": str(layout.data_parquet),
        "train_ids": train_ids, "num_mask_classes": n_mask, "progress": job.get("progress"),
    }, run_name=run_name(fold, fraction), storage=layout.ray_storage)
    out = layout.autoencoder(fold, fraction)
    history, step = copy_export(result, AutoencoderFit.EXPORT, out, CHECKPOINT_DIR)

    # The scale factor of the fold's training latents (posterior means), so that the noise
    # process sees unit-variance data (MONAI's LatentDiffusionInferer convention).
    set_threads(cfg.diffusion.cpus_per_worker)
    x0, _ = training_tensors(read_parquet(layout.data_parquet).subset_ids(train_ids), n_mask)
    model = load_autoencoder(out / CHECKPOINT_DIR)
    latents = encode(model, x0)
    recon = decode(model, latents)
    train_l1 = float((recon - x0).abs().mean())

    write_text(out / LOSS_HISTORY, "".join(json.dumps(row) + "\n" for row in history))
    write_json(out / TRAIN_IDS, {"fold": fold, "fraction": fraction, "train_ids": train_ids, "test_ids": test_ids,
                                 "disjoint": not (set(train_ids) & set(test_ids))})
    side = latent_side(cfg.data.image_size, cfg.autoencoder)
    write_json(out / AUTOENCODER_META, {  # written last: marks the fold complete
        "fold": fold,
        "fraction": fraction,
        "digest": autoencoder_digest(cfg, fraction),
        "autoencoder": cfg_dict["autoencoder"],
        "in_channels": int(x0.shape[1]),
        "latent_shape": [cfg.autoencoder.latent_channels] + [side] * cfg.data.dims,
        "scale_factor": scale_factor(latents),
        "latent_mean": float(latents.mean()),
        "train_l1": train_l1,
        "num_train_images": len(train_ids),
        "disjoint": not (set(train_ids) & set(test_ids)),
        "steps": step,
        "final_loss": history[-1]["loss_ema"] if history else None,
        "train_seconds": round(time.time() - t0, 1),
    })
    log.debug("autoencoder: fold %s done in %.0fs (training L1 %.4f)", name, time.time() - t0, train_l1)


__all__ = ["train_autoencoders", "run_name"]
