"""The Ray Train worker that fits one generator: ``train_loop_per_worker(config)``.

Every rank reports at the same steps; rank 0 attaches the checkpoint (training state, EMA
denoiser and the loss history) and posts its step to the driver's progress bar (``config["progress"]``,
a :class:`raysynth.console.ProgressBoard` actor, or None). A restored run continues at the saved step, and each rank draws
its batch from a generator seeded by (seed, fold, rank, step), so a resumed run sees exactly the
batches an uninterrupted one would have seen. Imports library modules only: this runs in workers.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from raysynth.config import from_dict
from raysynth.console import post
from raysynth.data.schema import read_parquet
from raysynth.diffusion.trainer import GeneratorFit, training_tensors
from raysynth.runtime import derive_seed, set_threads


def _quiet_report_log() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` at INFO under a logger named by its file path
    (``logging.getLogger(__file__)`` in its execution context), out of reach of ``ray.train``'s
    level. Our worker prints its own progress line; silence that one logger if it is where 2.60 has it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a later Ray moved it: its lines come back, nothing breaks
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


_SEED_INIT = 11


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. Shapes: x0 ``(N, C, *S)`` in [-1, 1]; labels ``(N,)``."""
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

    # 2. Model, EMA, optimiser and the noise process. The initial weights are seeded by (seed, fold),
    #    so a run is reproducible; every rank starts from the same weights (DDP also broadcasts rank 0's).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, fold, _SEED_INIT) % 2**63)
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
    if rank == 0:
        post(config.get("progress"), name, start)  # the driver's bar (raysynth.console.ProgressBoard)
    fit.trained = ray.train.torch.prepare_model(fit.model)  # DDP when there are several workers
    x0, labels = x0.to(device), labels.to(device)

    # 4. Loop. Each rank draws its own batch from a generator seeded by (seed, fold, rank, step),
    #    so a resumed run sees exactly the batches an uninterrupted one would have seen.
    loss_ema, t_last = (history[-1]["loss_ema"] if history else None), time.time()
    t_post = t_last
    for step in range(start, d.train_steps):
        g = torch.Generator(device="cpu").manual_seed(derive_seed(cfg.seed, fold, rank, step))
        idx = torch.randint(0, x0.shape[0], (d.batch_size,), generator=g).to(device)
        value = fit.step(x0[idx], labels[idx], generator=g)
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        done = step + 1
        if rank == 0 and (time.time() - t_post >= 1.0 or done == d.train_steps):  # about once a second
            post(config.get("progress"), name, done, loss=loss_ema)
            t_post = time.time()
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
