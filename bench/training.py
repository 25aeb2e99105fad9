"""Benchmark 3 of issue 9: generator training throughput, Ray Train against a plain loop.

Rows (all on the same prepared fold-0 training images, default 32x32 denoiser [32, 64, 64],
``diffusion.batch_size`` 32 per worker, ``GeneratorFit.step`` in every row):

* ``ray_1w``: raysynth's ``train_loop_per_worker`` under a ``TorchTrainer`` with 1 worker of 1 CPU
  (exactly what ``raysynth train`` runs, with its reports every ``log_every`` steps and one
  checkpoint at the end), into a fresh storage folder.
* ``ray_2w``: the same with 2 workers of 1 CPU each (DDP over gloo, 1 torch thread each).
* ``plain``: the same loop in this process (same seeded batches, 1 thread, nice 15 like Ray's
  workers), no Ray. ``plain_bf16``: the plain loop with ``diffusion.cpu_bf16=true`` (CPU bf16 autocast).

Steady-state throughput is the median over report windows of ``log_every`` steps, the first
window (warm-up) left out: images/s = workers x batch / seconds per step. The end-to-end figure
divides all images by the wall time of ``fit()`` (worker start, data load, checkpoint included).
Targets: ray_1w / plain >= 0.95; 2 workers against 1 is reported (no target). Rows interleave, and
ratios are of medians (the machine is shared). ``--part bf16``: plain and ray_1w, each with and
without ``diffusion.cpu_bf16``. ``--part components`` times the parts of one step
(forward+backward, clipping, AdamW for-loop/fused, EMA for-loop/foreach) in this process.

    .venv/bin/python bench/training.py --quick          # ~2 min (+ ~1.5 min once, for the run)
    .venv/bin/python bench/training.py [--part throughput|components] [--run DIR] [--json F]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import torch

from raysynth.config import apply_override
from sampling import base_argparser, bench_config, ensure_run, interleaved, log, machine, start_ray, worker_niceness

SIZES = {"quick": (16, 4, 1), "full": (48, 8, 3)}  # (steps per row, log_every, repeats)


def _setup(cfg, layout):
    from raysynth.data.schema import read_parquet
    from raysynth.diffusion.trainer import GeneratorFit, training_tensors
    from raysynth.artifacts import read_json

    ids = read_json(layout.ddpm(0) / "train_ids.json")["train_ids"]
    x0, labels = training_tensors(read_parquet(layout.data_parquet).subset_ids(ids), 0)
    fit = GeneratorFit(cfg.diffusion, dims=cfg.data.dims, in_channels=x0.shape[1], image_size=cfg.data.image_size,
                       num_classes=int(read_json(layout.fingerprint)["num_classes"]))
    return ids, x0, labels, fit


def summarise(windows: list[float], images_per_step: int, steps: int, wall: float) -> dict:
    spp = statistics.median(windows[1:] or windows)
    return {"seconds_per_step": spp, "images_per_s": images_per_step / spp, "wall_s": wall,
            "end_to_end_images_per_s": images_per_step * steps / wall}


@worker_niceness()
def plain_row(cfg, layout) -> dict:
    """The worker's loop without Ray: same data, model, seeds and windows (see train_loop_per_worker)."""
    from raysynth.runtime import derive_seed

    torch.set_num_threads(1)
    d, t0 = cfg.diffusion, time.perf_counter()
    _, x0, labels, fit = _setup(cfg, layout)
    windows, t_last = [], time.perf_counter()
    for step in range(d.train_steps):
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, 0, 0, step))
        idx = torch.randint(0, x0.shape[0], (d.batch_size,), generator=g)
        fit.step(x0[idx], labels[idx], g)
        if (step + 1) % d.log_every == 0:
            windows.append((time.perf_counter() - t_last) / d.log_every)
            t_last = time.perf_counter()
    return summarise(windows, d.batch_size, d.train_steps, time.perf_counter() - t0)


def ray_row(cfg, layout, workers: int) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysynth.diffusion.worker import train_loop_per_worker
    from raysynth.artifacts import read_json

    d = cfg.diffusion
    storage = tempfile.mkdtemp(prefix="raysynth-bench9-train-")
    ids = read_json(layout.ddpm(0) / "train_ids.json")["train_ids"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "fold": 0, "name": "0", "data_path": str(layout.data_parquet),
                           "train_ids": ids, "num_classes": int(read_json(layout.fingerprint)["num_classes"]),
                           "num_mask_classes": 0},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench-{uuid.uuid4().hex[:8]}", storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    try:
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
        with result.checkpoint.as_directory() as ckpt:
            history = json.loads(Path(ckpt, "history.json").read_text())
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return summarise([h["seconds_per_step"] for h in history], workers * d.batch_size, d.train_steps, wall)


def components(cfg, layout, reps: int = 7) -> dict:
    """Median seconds of each part of one step, and the candidate replacements, 1 thread."""
    from diffusers.training_utils import EMAModel

    torch.set_num_threads(1)
    _, x0, labels, fit = _setup(cfg, layout)
    x, y, m = x0[:cfg.diffusion.batch_size], labels[:cfg.diffusion.batch_size], fit.model
    fwd_bwd = lambda: fit.process.training_loss(m, x, y).backward()  # noqa: E731
    fwd_bwd()
    fused = torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True)
    ema_fe = EMAModel(m.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3, foreach=True)
    parts = {"forward_backward": fwd_bwd, "clip_grad_norm": lambda: torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0),
             "adamw_forloop": fit.optimizer.step, "adamw_fused": fused.step,
             "ema_forloop": lambda: fit.ema.step(m.parameters()), "ema_foreach": lambda: ema_fe.step(m.parameters())}
    out = {}
    for name, f in parts.items():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
        log(f"  {name:<18} {out[name] * 1e3:9.2f} ms")
    return out


def main(argv=None) -> int:
    p = base_argparser(__doc__)
    p.add_argument("--part", choices=["throughput", "bf16", "components", "all"], default="all")
    p.add_argument("--steps", type=int, help="override the steps per row")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    steps, every, reps = SIZES["quick" if args.quick else "full"]
    steps = args.steps or steps
    cfg = bench_config(f"diffusion.train_steps={steps}", f"diffusion.log_every={every}", f"diffusion.checkpoint_every={steps}")
    report = {"machine": machine(), "ray_startup_s": start_ray(cfg)}
    layout = ensure_run(args.run, bench_config())
    log(f"ray startup {report['ray_startup_s']:.1f}s (excluded); run {layout.root}; {steps} steps per row, "
        f"batch {cfg.diffusion.batch_size}, windows of {every}")
    bf16 = apply_override(cfg, "diffusion.cpu_bf16=true")
    if args.part == "bf16":
        res = interleaved({"plain": lambda: plain_row(cfg, layout), "plain_bf16": lambda: plain_row(bf16, layout),
                           "ray_1w": lambda: ray_row(cfg, layout, 1), "ray_1w_bf16": lambda: ray_row(bf16, layout, 1)},
                          args.reps or reps)
        speed = {k: statistics.median(r["images_per_s"] for r in v) for k, v in res.items()}
        ratios = {"plain_bf16_over_plain": speed["plain_bf16"] / speed["plain"],
                  "ray_1w_bf16_over_ray_1w": speed["ray_1w_bf16"] / speed["ray_1w"]}
        report["bf16"] = {"steps": steps, "log_every": every, "rows": res, "median_images_per_s": speed, "ratios": ratios}
        for k in res:
            log(f"  {k:<11} steady {speed[k]:7.1f} images/s (median)")
        for k, v in ratios.items():
            log(f"  ratio {k}: {v:.3f}")
    if args.part in ("throughput", "all"):
        res = interleaved({"plain": lambda: plain_row(cfg, layout), "ray_1w": lambda: ray_row(cfg, layout, 1),
                           "ray_2w": lambda: ray_row(cfg, layout, 2), "plain_bf16": lambda: plain_row(bf16, layout)},
                          args.reps or reps)
        speed = {k: statistics.median(r["images_per_s"] for r in v) for k, v in res.items()}
        e2e = {k: statistics.median(r["end_to_end_images_per_s"] for r in v) for k, v in res.items()}
        ratios = {"ray_1w_over_plain": speed["ray_1w"] / speed["plain"], "ray_2w_over_ray_1w": speed["ray_2w"] / speed["ray_1w"],
                  "plain_bf16_over_plain": speed["plain_bf16"] / speed["plain"],
                  "end_to_end_ray_1w_over_plain": e2e["ray_1w"] / e2e["plain"]}
        report["throughput"] = {"steps": steps, "log_every": every, "rows": res, "median_images_per_s": speed,
                                "median_end_to_end_images_per_s": e2e, "ratios": ratios}
        for k in res:
            log(f"  {k:<11} steady {speed[k]:7.1f} images/s   end-to-end {e2e[k]:7.1f} images/s (medians)")
        for k, v in ratios.items():
            log(f"  ratio {k}: {v:.3f}")
        r = ratios["ray_1w_over_plain"]
        log(f"target 3 (ray_1w / plain >= 0.95, steady state): {'MET' if r >= 0.95 else 'MISSED'} ({r:.3f})")
    if args.part in ("components", "all"):
        log("components of one step (median ms, 1 thread):")
        report["components_s"] = components(cfg, layout)
    report["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
