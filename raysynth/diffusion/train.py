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
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from raysynth.config import Config, from_dict
from raysynth.errors import StageError
from raysynth.layout import Layout, fraction_tag, read_json, write_json
from raysynth.runtime import derive_seed, ensure_ray, set_threads

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
"""Inside ``OUT/ddpm/fold_k``: the EMA denoiser (``Denoiser.save_pretrained``) used for sampling."""


def digest(cfg: Config, fraction: float = 1.0) -> str:
    """A generator is stale when the data, the splits, the diffusion config or its subset change."""
    base = cfg.section_digest("data", "cv", "diffusion")  # opt-in fields count only when set
    return base if fraction == 1.0 else f"{base}{fraction_tag(fraction)}"


def is_complete(cfg: Config, layout: Layout, fold: int, fraction: float = 1.0) -> bool:
    folder = layout.ddpm(fold, fraction)
    meta = folder / "config.json"
    if not meta.is_file() or not (folder / CHECKPOINT_DIR).is_dir():
        return False
    return read_json(meta).get("digest") == digest(cfg, fraction)


def generator_train_ids(cfg: Config, fold: dict, labels_by_id: dict[str, int]) -> list[str]:
    """The real ids fold k's generator may see: ``fold["train"]`` (the fold's training part, or
    one real fraction's subset of it), optionally capped.

    The cap (``diffusion.max_train_images``; the paper trained on 350 scans) keeps the class
    proportions and is seeded, so the same fold always gets the same subset.
    """
    train = list(fold["train"])
    cap = cfg.diffusion.max_train_images
    if cap is None or cap >= len(train):
        return train
    from sklearn.model_selection import train_test_split

    labels = [labels_by_id[i] for i in train]
    kept, _ = train_test_split(
        train, train_size=cap, stratify=labels, random_state=derive_seed(cfg.seed, fold["fold"], 7) % 2**31
    )
    return sorted(kept)


def train_generators(
    cfg: Config, layout: Layout, folds: Optional[list[int]] = None, force: bool = False
) -> list[dict[str, Any]]:
    """Train (or resume, or skip) the generator of every requested fold and real fraction
    (``design.generator_fractions``). Returns their metadata."""
    # Imported here, not at module level: a sampler actor imports this module for load_generator
    # and would otherwise pay for the preprocessing stack (sklearn, nibabel, ...).
    from raysynth.data.prepare import load_prepared
    from raysynth.study.design import generator_fractions, scarcity_subsets

    records, fingerprint, splits = load_prepared(layout)
    labels_by_id = dict(zip(records.ids, records.labels.tolist()))
    wanted = [f["fold"] for f in splits] if folds is None else folds
    unknown = sorted(set(wanted) - {f["fold"] for f in splits})
    if unknown:
        raise StageError(f"train: folds {unknown} are not in splits.json (it has {len(splits)} folds)")
    fractions = generator_fractions(cfg)
    subsets = scarcity_subsets(cfg, layout, splits, labels_by_id, dict(zip(records.ids, records.subjects)))

    jobs = []
    for fold in splits:
        k = fold["fold"]
        if k not in wanted:
            continue
        for p in fractions:
            if not force and is_complete(cfg, layout, k, p):
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
        if cfg.diffusion.parallel_folds and len(jobs) > 1:
            import ray

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
            for job in jobs:
                _fit_fold(cfg.to_dict(), str(layout.root), job, fingerprint)
    return [read_json(layout.ddpm(f["fold"], p) / "config.json") for f in splits if f["fold"] in wanted for p in fractions]


def fold_slots(cfg: Config) -> int:
    """How many folds can train at once: ``diffusion.max_parallel_folds``, else what the cluster
    holds now (CPUs, and GPUs when used) divided by one fit's workers; at least 1."""
    import ray

    d = cfg.diffusion
    if d.max_parallel_folds is not None:
        return d.max_parallel_folds
    res = ray.cluster_resources()
    slots = int(res.get("CPU", 0) // max(1, d.num_workers * d.cpus_per_worker))
    if d.use_gpu:
        slots = min(slots, int(res.get("GPU", 0) // d.num_workers))
    return max(1, slots)


def run_name(fold: int, fraction: float = 1.0) -> str:
    return f"ddpm_fold_{fold}{fraction_tag(fraction)}"


def _fit_fold(cfg_dict: dict, root: str, job: dict, fingerprint: dict) -> None:
    """Fit one generator; ``job``: fold, fraction, train_ids, test_ids, subset_size."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = from_dict(cfg_dict)
    layout = Layout.at(root)
    d = cfg.diffusion
    fold, fraction, train_ids, test_ids = job["fold"], job["fraction"], job["train_ids"], job["test_ids"]
    name = f"{fold}{fraction_tag(fraction)}"
    t0 = time.time()
    log.info("train: fold %s: %d real training images, %d steps, %d worker(s)", name, len(train_ids), d.train_steps, d.num_workers)
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
    tmp = out / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    tmp.replace(out / "metrics.jsonl")
    write_json(out / "train_ids.json", {"fold": fold, "fraction": fraction, "real_subset_size": job["subset_size"],
                                        "train_ids": train_ids, "test_ids": test_ids,
                                        "disjoint": not (set(train_ids) & set(test_ids))})
    # Written last: its presence with a matching digest marks the fold complete.
    write_json(out / "config.json", {
        "generator_id": f"ddpm-fold{name}-{digest(cfg)}",
        "fold": fold,
        "fraction": fraction,
        "digest": digest(cfg, fraction),
        "process": cfg.diffusion.process,
        "diffusion": cfg_dict["diffusion"],
        "num_classes": int(fingerprint["num_classes"]),
        "class_names": fingerprint["class_names"],
        "num_mask_classes": _mask_classes(cfg, fingerprint),
        "dims": cfg.data.dims,
        "image_size": cfg.data.image_size,
        "spacing": fingerprint.get("spacing"),
        "num_train_images": len(train_ids),
        "steps": state_step,
        "final_loss": history[-1]["loss_ema"] if history else None,
        "train_seconds": round(time.time() - t0, 1),
    })
    log.info("train: fold %s done in %.0fs (final loss %.4f)", name, time.time() - t0, history[-1]["loss_ema"] if history else float("nan"))


def _mask_classes(cfg: Config, fingerprint: dict) -> int:
    return int(fingerprint.get("num_mask_classes") or 0) if cfg.data.task == "segmentation" else 0


def _quiet_report_log() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` at INFO under a logger named by its file path
    (``logging.getLogger(__file__)`` in its execution context), out of reach of ``ray.train``'s
    level. Our worker prints its own progress line; silence that one logger if it is where 2.60 has it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a later Ray moved it: its lines come back, nothing breaks
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. Shapes: x0 ``(N, C, *S)`` in [-1, 1]; labels ``(N,)``."""
    import ray.train
    import ray.train.torch
    import torch

    from raysynth.data.schema import read_parquet
    from raysynth.diffusion.trainer import GeneratorFit, training_tensors

    cfg = from_dict(config["cfg"])
    d = cfg.diffusion
    set_threads(d.cpus_per_worker)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report is ours to print
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    fold, name = config["fold"], config["name"]

    # 1. Data: the fold's generator ids only, held in memory (hundreds of scans at most).
    data = read_parquet(config["data_path"]).subset_ids(config["train_ids"])
    x0, labels = training_tensors(data, config["num_mask_classes"])

    # 2. Model, EMA, optimiser and the noise process.
    fit = GeneratorFit(d, dims=cfg.data.dims, in_channels=x0.shape[1], image_size=cfg.data.image_size,
                       num_classes=config["num_classes"], device=device)
    fit.process.check_data_scale(float(x0.std()))
    start, history = 0, []

    # 3. Resume from the last reported checkpoint, if Ray Train restored one.
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as path:
            start = fit.load_state_dict(torch.load(Path(path) / "state.pt", map_location=device, weights_only=False))
            history = json.loads((Path(path) / "history.json").read_text())
        if rank == 0:
            _say(f"[train fold {name}] resuming at step {start}")
    fit.trained = ray.train.torch.prepare_model(fit.model)  # DDP when there are several workers
    x0, labels = x0.to(device), labels.to(device)

    # 4. Loop. Each rank draws its own batch from a generator seeded by (seed, fold, rank, step),
    #    so a resumed run sees exactly the batches an uninterrupted one would have seen.
    loss_ema, t_last = (history[-1]["loss_ema"] if history else None), time.time()
    for step in range(start, d.train_steps):
        g = torch.Generator(device="cpu").manual_seed(derive_seed(cfg.seed, fold, rank, step))
        idx = torch.randint(0, x0.shape[0], (d.batch_size,), generator=g).to(device)
        value = fit.step(x0[idx], labels[idx], generator=g)
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        done = step + 1
        if done % d.log_every and done % d.checkpoint_every and done != d.train_steps:
            continue
        since = done - (history[-1]["step"] if history else start)
        metrics = {"step": done, "loss": value, "loss_ema": loss_ema, "fold": fold,
                   "seconds_per_step": (time.time() - t_last) / max(1, since)}
        t_last = time.time()
        history.append(metrics)
        if rank == 0:
            _say(f"[train fold {name}] step {done}/{d.train_steps} loss {loss_ema:.4f}")
        if done % d.checkpoint_every == 0 or done == d.train_steps:
            _report_with_checkpoint(metrics, history, fit, done, rank)
        else:
            ray.train.report(metrics)


def _say(message: str) -> None:
    # Ray Train routes print() through the root logger, which doubles lines; stdout is forwarded once.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _report_with_checkpoint(metrics: dict, history: list, fit, step: int, rank: int) -> None:
    """Every rank reports; rank 0 attaches the checkpoint: state, EMA denoiser, loss history."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            path = Path(tmp)
            torch.save(fit.state_dict(step), path / "state.pt")
            fit.save_ema(path / "ema")  # what the sampler loads
            (path / "history.json").write_text(json.dumps(history))
            (path / "progress.json").write_text(json.dumps({"step": step}))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:08d}")


def load_generator(layout: Layout, fold: int, device: str = "cpu", fraction: float = 1.0):
    """The trained EMA denoiser of a (fold, fraction), its noise process and its metadata."""
    from raysynth.diffusion.networks import Denoiser
    from raysynth.diffusion.process import build_process
    from raysynth.config import DiffusionConfig, section_from_dict

    folder = layout.ddpm(fold, fraction)
    meta_path = folder / "config.json"
    if not meta_path.is_file():
        raise StageError(f"no trained generator for fold {fold} at {folder}; run `raysynth train` first")
    meta = read_json(meta_path)
    model = Denoiser.from_pretrained(folder / CHECKPOINT_DIR, map_location=device).to(device).eval()
    process = build_process(section_from_dict(DiffusionConfig, meta["diffusion"], "diffusion"))
    return model, process, meta


__all__ = ["train_generators", "train_loop_per_worker", "load_generator", "is_complete", "generator_train_ids"]
