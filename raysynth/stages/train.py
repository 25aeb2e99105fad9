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
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raysynth.artifacts import (
    CHECKPOINT_DIR,
    GENERATOR_META,
    LOSS_HISTORY,
    TRAIN_IDS,
    Layout,
    fraction_tag,
    generator_complete,
    generator_digest,
    read_prepared,
    read_subsets,
)
from raysynth.config import Config, from_dict
from raysynth.console import Progress, follow_board, start_board
from raysynth.design import generator_fractions, generator_train_ids
from raysynth.diffusion.worker import train_loop_per_worker
from raysynth.errors import StageError
from raysynth.io import read_json, write_json, write_text
from raysynth.runtime import ensure_ray

log = logging.getLogger(__name__)

def train_generators(
    cfg: Config, layout: Layout, folds: Optional[list[int]] = None, force: bool = False
) -> list[dict[str, Any]]:
    """Train (or resume, or skip) the generator of every requested fold and real fraction
    (``design.generator_fractions``). Returns their metadata."""
    records, fingerprint, splits = read_prepared(layout, cfg)
    labels_by_id = dict(zip(records.ids, records.labels.tolist()))
    wanted = [f["fold"] for f in splits] if folds is None else folds
    unknown = sorted(set(wanted) - {f["fold"] for f in splits})
    if unknown:
        raise StageError(f"train: folds {unknown} are not in splits.json (it has {len(splits)} folds)")
    fractions = generator_fractions(cfg)
    subsets = read_subsets(layout, cfg)

    jobs = []
    for fold in splits:
        k = fold["fold"]
        if k not in wanted:
            continue
        for p in fractions:
            if not force and generator_complete(cfg, layout, k, p):
                log.info("train: fold %d%s is up to date, skipping", k, fraction_tag(p))
                continue
            if force:
                shutil.rmtree(layout.ddpm(k, p), ignore_errors=True)
                shutil.rmtree(layout.ray_storage / run_name(k, p), ignore_errors=True)
            subset = subsets[k][p]
            train_ids = generator_train_ids(cfg, {**fold, "train": subset}, labels_by_id)
            overlap = set(train_ids) & set(fold["test"])
            if overlap:  # would be a bug in splits; never train a generator on test data
                raise StageError(f"train: fold {k} generator ids overlap its test ids: {sorted(overlap)[:5]}")
            jobs.append({"fold": k, "fraction": p, "train_ids": train_ids, "test_ids": list(fold["test"]),
                         "subset_size": len(subset)})

    if jobs:
        ensure_ray(cfg)
        # One bar over every generator's steps: rank 0 of each fit posts its step to a small actor
        # (console.ProgressBoard) that a driver thread polls; the bar's note is each fold's step and loss.
        board = start_board()
        jobs = [{**job, "progress": board} for job in jobs]
        with Progress("train", len(jobs) * cfg.diffusion.train_steps, "steps") as bar, \
                follow_board(board, bar, lambda snap: _describe(snap, cfg.diffusion.train_steps)):
            if cfg.diffusion.parallel_folds and len(jobs) > 1:
                # The driver-side call of each TorchTrainer blocks, so each fold's fit runs in a
                # zero-CPU task; the workers themselves reserve the real resources.
                fit_remote = ray.remote(num_cpus=0)(_fit_fold)
                slots = fold_slots(cfg)
                log.info("train: %d generators, at most %d at a time", len(jobs), slots)
                waiting, running = list(jobs), []
                while waiting or running:
                    while waiting and len(running) < slots:  # a fit that cannot get workers would time out
                        running.append(fit_remote.remote(cfg.to_dict(), str(layout.root), waiting.pop(0), fingerprint))
                    done, running = ray.wait(running, num_returns=1)
                    ray.get(done)
            else:
                log.info("train: %d generator(s), one at a time", len(jobs))
                for job in jobs:
                    _fit_fold(cfg.to_dict(), str(layout.root), job, fingerprint)
    return [read_json(layout.ddpm(f["fold"], p) / GENERATOR_META) for f in splits if f["fold"] in wanted for p in fractions]


def fold_slots(cfg: Config) -> int:
    """How many folds can train at once: ``diffusion.max_parallel_folds``, else what the cluster
    holds now (CPUs, and GPUs when used) divided by one fit's workers; at least 1."""
    d = cfg.diffusion
    if d.max_parallel_folds is not None:
        return d.max_parallel_folds
    res = ray.cluster_resources()
    slots = int(res.get("CPU", 0) // max(1, d.num_workers * d.cpus_per_worker))
    if d.use_gpu:
        slots = min(slots, int(res.get("GPU", 0) // d.num_workers))
    return max(1, slots)


def _describe(snapshot: dict[str, dict], steps: int) -> str:
    """``fold 0 20/30 loss 0.5210, fold 1 ...`` for the folds that have started."""
    parts = []
    for name, s in sorted(snapshot.items()):
        loss = f" loss {s['loss']:.4f}" if isinstance(s.get("loss"), (int, float)) else ""
        parts.append(f"fold {name} {s['done']}/{steps}{loss}")
    return ", ".join(parts) or "starting the training workers"


def run_name(fold: int, fraction: float = 1.0) -> str:
    return f"ddpm_fold_{fold}{fraction_tag(fraction)}"


def _fit_fold(cfg_dict: dict, root: str, job: dict, fingerprint: dict) -> None:
    """Fit one generator; ``job``: fold, fraction, train_ids, test_ids, subset_size."""
    cfg = from_dict(cfg_dict)
    layout = Layout.at(root)
    d = cfg.diffusion
    fold, fraction, train_ids, test_ids = job["fold"], job["fraction"], job["train_ids"], job["test_ids"]
    name = f"{fold}{fraction_tag(fraction)}"
    t0 = time.time()
    log.debug("train: fold %s: %d real training images, %d steps, %d worker(s)", name, len(train_ids), d.train_steps, d.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg_dict,
            "fold": fold,
            "name": name,
            "data_path": str(layout.data_parquet),
            "train_ids": train_ids,
            "num_classes": int(fingerprint["num_classes"]),
            "num_mask_classes": _mask_classes(cfg, fingerprint),
            "progress": job.get("progress"),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=d.num_workers, use_gpu=d.use_gpu, resources_per_worker={"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})}
        ),
        run_config=ray.train.RunConfig(
            name=run_name(fold, fraction),
            storage_path=str(layout.ray_storage),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise StageError(f"train: fold {name} finished without a checkpoint")
    out = layout.ddpm(fold, fraction)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        staging = out / f".{CHECKPOINT_DIR}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(ckpt / "ema", staging)
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        staging.replace(out / CHECKPOINT_DIR)
        history = json.loads((ckpt / "history.json").read_text())
        state_step = json.loads((ckpt / "progress.json").read_text())["step"]
    write_text(out / LOSS_HISTORY, "".join(json.dumps(row) + "\n" for row in history))
    write_json(out / TRAIN_IDS, {"fold": fold, "fraction": fraction, "real_subset_size": job["subset_size"],
                                        "train_ids": train_ids, "test_ids": test_ids,
                                        "disjoint": not (set(train_ids) & set(test_ids))})
    # Written last: its presence with a matching digest marks the fold complete.
    write_json(out / GENERATOR_META, {
        "generator_id": f"ddpm-fold{name}-{generator_digest(cfg)}",
        "fold": fold,
        "fraction": fraction,
        "digest": generator_digest(cfg, fraction),
        "process": cfg.diffusion.process,
        "diffusion": cfg_dict["diffusion"],
        "num_classes": int(fingerprint["num_classes"]),
        "class_names": fingerprint["class_names"],
        "num_mask_classes": _mask_classes(cfg, fingerprint),
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
    log.debug("train: fold %s done in %.0fs (final loss %.4f)", name, time.time() - t0, history[-1]["loss_ema"] if history else float("nan"))


def _mask_classes(cfg: Config, fingerprint: dict) -> int:
    return int(fingerprint.get("num_mask_classes") or 0) if cfg.data.task == "segmentation" else 0



__all__ = ["train_generators", "fold_slots", "run_name"]
