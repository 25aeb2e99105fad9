"""The driver side of the per-fold fits (generators, and the latent path's autoencoders) on Ray Train.

Shape: ``train_loop_per_worker(config)`` -> ``ScalingConfig`` -> ``TorchTrainer``, one trainer per
(fold, real fraction). Several trainers run at once when the cluster holds them (each driver-side
``fit()`` blocks, so each runs in a zero-CPU task; the workers reserve the real resources). Rank 0
of every fit posts its step to one small actor (:class:`raysynth.console.ProgressBoard`) that a
driver thread polls into one bar over all folds. Used by the ``autoencoder`` and ``train`` stages.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import ray
import ray.train
from ray.train.torch import TorchTrainer

from raysynth.artifacts import Layout, fraction_tag, read_subsets
from raysynth.config import Config
from raysynth.design import generator_fractions, generator_train_ids
from raysynth.console import Progress, follow_board, start_board
from raysynth.errors import StageError

log = logging.getLogger(__name__)


def run_fits(cfg: Config, root: str, jobs: list[dict], fit_one: Callable[..., None], *extra: Any,
             what: str, steps: int) -> None:
    """Run ``fit_one(cfg_dict, root, job, *extra)`` for every job (each a dict with ``fold`` and a
    ``name``), in parallel where ``diffusion.parallel_folds`` allows, under one bar of ``steps`` a job."""
    if not jobs:
        return
    board = start_board()
    jobs = [{**job, "progress": board} for job in jobs]
    with Progress(what, len(jobs) * steps, "steps") as bar, \
            follow_board(board, bar, lambda snap: describe(snap, steps)):
        if cfg.diffusion.parallel_folds and len(jobs) > 1:
            fit_remote = ray.remote(num_cpus=0)(fit_one)
            slots = fold_slots(cfg)
            log.info("%s: %d fits, at most %d at a time", what, len(jobs), slots)
            waiting, running = list(jobs), []
            while waiting or running:
                while waiting and len(running) < slots:  # a fit that cannot get workers would time out
                    running.append(fit_remote.remote(cfg.to_dict(), root, waiting.pop(0), *extra))
                done, running = ray.wait(running, num_returns=1)
                ray.get(done)
        else:
            log.info("%s: %d fit(s), one at a time", what, len(jobs))
            for job in jobs:
                fit_one(cfg.to_dict(), root, job, *extra)


def fold_jobs(cfg: Config, layout: Layout, records, splits: list[dict], folds: Optional[list[int]], force: bool, *,
              what: str, folder: Callable[..., Any], complete: Callable[..., bool],
              run_name: Callable[..., str]) -> list[dict]:
    """The (fold, fraction) fits to run: every requested fold and ``design.generator_fractions``,
    less the complete ones (unless ``force``, which also clears their folder and Ray run). Each job
    names its real training ids (the fraction's subset, capped by ``diffusion.max_train_images``),
    checked disjoint from the fold's test ids."""
    labels_by_id = dict(zip(records.ids, records.labels.tolist()))
    wanted = [f["fold"] for f in splits] if folds is None else folds
    unknown = sorted(set(wanted) - {f["fold"] for f in splits})
    if unknown:
        raise StageError(f"{what}: folds {unknown} are not in splits.json (it has {len(splits)} folds)")
    subsets = read_subsets(layout, cfg)
    jobs = []
    for fold in splits:
        k = fold["fold"]
        if k not in wanted:
            continue
        for p in generator_fractions(cfg):
            if not force and complete(cfg, layout, k, p):
                log.info("%s: fold %d%s is up to date, skipping", what, k, fraction_tag(p))
                continue
            if force:
                shutil.rmtree(folder(k, p), ignore_errors=True)
                shutil.rmtree(layout.ray_storage / run_name(k, p), ignore_errors=True)
            subset = subsets[k][p]
            train_ids = generator_train_ids(cfg, {**fold, "train": subset}, labels_by_id)
            overlap = set(train_ids) & set(fold["test"])
            if overlap:  # would be a bug in splits; never fit on test data
                raise StageError(f"{what}: fold {k} training ids overlap its test ids: {sorted(overlap)[:5]}")
            jobs.append({"fold": k, "fraction": p, "name": f"{k}{fraction_tag(p)}", "train_ids": train_ids,
                         "test_ids": list(fold["test"]), "subset_size": len(subset)})
    return jobs


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


def describe(snapshot: dict[str, dict], steps: int) -> str:
    """``fold 0 20/30 loss 0.5210, fold 1 ...`` for the folds that have started."""
    parts = []
    for name, s in sorted(snapshot.items()):
        loss = f" loss {s['loss']:.4f}" if isinstance(s.get("loss"), (int, float)) else ""
        parts.append(f"fold {name} {s['done']}/{steps}{loss}")
    return ", ".join(parts) or "starting the training workers"


def ray_train_fit(cfg: Config, loop: Callable[[dict], None], loop_config: dict, *, run_name: str,
                  storage: Path) -> ray.train.Result:
    """One ``TorchTrainer`` fit with the diffusion section's workers, GPUs and failure policy.
    Re-running with the same ``storage``/``run_name`` resumes from its last checkpoint."""
    d = cfg.diffusion
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=d.num_workers, use_gpu=d.use_gpu,
            resources_per_worker={"CPU": d.cpus_per_worker, **({"GPU": 1} if d.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise StageError(f"{run_name}: the fit finished without a checkpoint")
    return result


def copy_export(result: ray.train.Result, export: str, out: Path, dest: str) -> tuple[list[dict], int]:
    """Copy the final checkpoint's exported network (folder ``export``) to ``out/dest`` atomically;
    return the loss history and the step it reached."""
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        staging = out / f".{dest}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(ckpt / export, staging)
        shutil.rmtree(out / dest, ignore_errors=True)
        staging.replace(out / dest)
        history = json.loads((ckpt / "history.json").read_text())
        step = json.loads((ckpt / "progress.json").read_text())["step"]
    return history, step


__all__ = ["run_fits", "fold_jobs", "fold_slots", "describe", "ray_train_fit", "copy_export"]
