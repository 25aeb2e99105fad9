"""The Ray Train workers: ``train_loop_per_worker(config)`` fits one generator,
``autoencoder_loop_per_worker(config)`` the latent path's autoencoder; both run :func:`fit_loop`.

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
from raysynth.runtime import derive_seed, set_threads, use_cpu_bf16


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
_SEED_AUTOENCODER = 13


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker of a generator. Shapes: x0 ``(N, C, *S)`` in [-1, 1]; labels ``(N,)``.

    In latent space (``config["autoencoder"]``: the fold's exported autoencoder and its scale
    factor) x0 becomes the scaled latents ``(N, L, *S/f)`` of the same images."""
    cfg = from_dict(config["cfg"])
    d = cfg.diffusion
    _worker_setup(d.cpus_per_worker)
    device = ray.train.torch.get_device()
    fold = config["fold"]

    # 1. Data: the fold's generator ids only, held in memory (hundreds of scans at most).
    data = read_parquet(config["data_path"]).subset_ids(config["train_ids"])
    x0, labels = training_tensors(data, config["num_mask_classes"])
    image_size = cfg.data.image_size
    if config.get("autoencoder"):
        from raysynth.diffusion.autoencoder import encode, latent_side, load_autoencoder

        ae = config["autoencoder"]
        x0 = encode(load_autoencoder(ae["path"], device=device), x0) * float(ae["scale_factor"])
        image_size = latent_side(image_size, cfg.autoencoder)

    # 2. Model, EMA, optimiser and the noise process. The initial weights are seeded by (seed, fold),
    #    so a run is reproducible; every rank starts from the same weights (DDP also broadcasts rank 0's).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, fold, _SEED_INIT) % 2**63)
        fit = GeneratorFit(d, dims=cfg.data.dims, in_channels=x0.shape[1], image_size=image_size,
                           num_classes=config["num_classes"], device=device)
    fit.process.check_data_scale(float(x0.std()))
    fit_loop(fit, x0, labels, config, steps=d.train_steps, batch_size=d.batch_size, log_every=d.log_every,
             checkpoint_every=d.checkpoint_every, seed=cfg.seed, what="train")


def autoencoder_loop_per_worker(config: dict) -> None:
    """One Ray Train worker of a fold's autoencoder, on the same joint tensor ``(N, C, *S)`` that a
    pixel generator would see (image channels, then the one-hot mask)."""
    from raysynth.diffusion.autoencoder import AutoencoderFit

    cfg = from_dict(config["cfg"])
    d, a = cfg.diffusion, cfg.autoencoder
    _worker_setup(d.cpus_per_worker)
    data = read_parquet(config["data_path"]).subset_ids(config["train_ids"])
    x0, labels = training_tensors(data, config["num_mask_classes"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, config["fold"], _SEED_AUTOENCODER) % 2**63)
        device = ray.train.torch.get_device()
        fit = AutoencoderFit(a, dims=cfg.data.dims, in_channels=x0.shape[1], device=device,
                             bf16=device.type == "cuda" or use_cpu_bf16(d.cpu_bf16))
    fit_loop(fit, x0, labels, config, steps=a.train_steps, batch_size=a.batch_size, log_every=a.log_every,
             checkpoint_every=a.checkpoint_every, seed=derive_seed(cfg.seed, _SEED_AUTOENCODER), what="autoencoder")


def _worker_setup(cpus: int) -> None:
    set_threads(cpus)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per report is ours to print
    _quiet_report_log()


def fit_loop(fit, x0: torch.Tensor, labels: torch.Tensor, config: dict, *, steps: int, batch_size: int,
             log_every: int, checkpoint_every: int, seed: int, what: str) -> None:
    """The Ray Train loop shared by every fit (``GeneratorFit``, ``AutoencoderFit``): resume from
    the restored checkpoint, seeded batches, progress posts, reports with checkpoints.

    ``fit`` has ``step(x, labels, generator) -> loss``, ``state_dict(step)``, ``load_state_dict``,
    ``export(path)`` and ``EXPORT`` (the checkpoint folder that ``export`` fills); ``fit.model`` is
    wrapped for DDP here. ``config``: ``fold``, ``name`` and ``progress`` (a ProgressBoard or None)."""
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    fold, name = config["fold"], config["name"]
    start, history = 0, []

    # 1. Resume from the last reported checkpoint, if Ray Train restored one.
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as path:
            start = fit.load_state_dict(torch.load(Path(path) / "state.pt", map_location=device, weights_only=False))
            history = json.loads((Path(path) / "history.json").read_text())
        if rank == 0:
            _say(f"[{what} fold {name}] resuming at step {start}")
    if rank == 0:
        post(config.get("progress"), name, start)  # the driver's bar (raysynth.console.ProgressBoard)
    fit.trained = ray.train.torch.prepare_model(fit.model)  # DDP when there are several workers
    x0, labels = x0.to(device), labels.to(device)

    # 2. Loop. Each rank draws its own batch from a generator seeded by (seed, fold, rank, step),
    #    so a resumed run sees exactly the batches an uninterrupted one would have seen.
    loss_ema, t_last = (history[-1]["loss_ema"] if history else None), time.time()
    t_post = t_last
    for step in range(start, steps):
        g = torch.Generator(device="cpu").manual_seed(derive_seed(seed, fold, rank, step))
        idx = torch.randint(0, x0.shape[0], (batch_size,), generator=g).to(device)
        value = fit.step(x0[idx], labels[idx], generator=g)
        loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
        done = step + 1
        if rank == 0 and (time.time() - t_post >= 1.0 or done == steps):  # about once a second
            post(config.get("progress"), name, done, loss=loss_ema)
            t_post = time.time()
        if done % log_every and done % checkpoint_every and done != steps:
            continue
        since = done - (history[-1]["step"] if history else start)
        metrics = {"step": done, "loss": value, "loss_ema": loss_ema, "fold": fold,
                   "seconds_per_step": (time.time() - t_last) / max(1, since)}
        t_last = time.time()
        history.append(metrics)
        if rank == 0:
            _say(f"[{what} fold {name}] step {done}/{steps} loss {loss_ema:.4f}")
        if done % checkpoint_every == 0 or done == steps:
            _report_with_checkpoint(metrics, history, fit, done, rank)
        else:
            ray.train.report(metrics)


def _say(message: str) -> None:
    # Ray Train routes print() through the root logger, which doubles lines; stdout is forwarded once.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _report_with_checkpoint(metrics: dict, history: list, fit, step: int, rank: int) -> None:
    """Every rank reports; rank 0 attaches the checkpoint: state, exported network, loss history."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            path = Path(tmp)
            torch.save(fit.state_dict(step), path / "state.pt")
            fit.export(path / fit.EXPORT)  # what the sampler loads
            (path / "history.json").write_text(json.dumps(history))
            (path / "progress.json").write_text(json.dumps({"step": step}))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:08d}")
