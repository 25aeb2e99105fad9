"""Benchmarks 1 and 2 of issue 9: the Ray Data sampler's overhead and its scaling with actors.

1. ``--part overhead``: the sample stage's Ray Data path (``sample._run_requests``: ``ShardSampler``
   actors via ``map_batches`` + ``ActorPoolStrategy``) with ONE actor of 1 CPU (``ray_1actor``)
   against ``plain``: a loop in this process, 1 torch thread, same trained denoiser,
   ``process.sample``, sampler, steps, batch and per-sample seeds, no files. ``inproc`` (raysynth's
   ``ShardSampler`` called here without Ray: adds decoding, checksums, the atomic Parquet write)
   splits the gap. Every row includes loading the model; the Ray row also starting the actor
   process (``startup_est_s`` estimates that part). Target: ray/plain >= 0.95 at >= 512 samples.
2. ``--part scaling``: 2 actors of 1 CPU (1 thread each) and 1 actor of 2 CPUs (2 threads), each
   against 1 actor of 1 CPU; same samples in 8 shards. Target: 2 actors >= 1.7x. A control without
   Ray (``noray_2procs`` / ``noray_1proc``: fresh processes running the plain loop) shows how far
   the machine itself scales at that moment.
3. ``--part variants``: candidate optimisations in the plain loop: channels_last, CPU bf16 autocast
   (and how far bf16 samples move from fp32 ones of the same seeds). ``--part bf16``: the option
   as the stage runs it: the Ray row with ``sampling.cpu_bf16=true`` against without, and the
   plain loop with and without bf16 autocast.
   What an actor imports before its first sample is measured by ``memory.py --part imports``.
4. ``--part stage``: a sample stage of 4 generators (the default preset's 4 folds; here links to
   the same trained generator, as ``ddpm/fold_0..3``), the same samples split over them:
   ``ray_one_pipeline`` (the stage as it is: one Ray Data pipeline, actors load each generator)
   against ``ray_per_generator`` (one pipeline, and so one actor start, per generator: the stage
   before issue 9) and ``plain`` (one loop over all of them). 1 actor of 1 CPU in both Ray rows.

Ray's startup is excluded from every row and reported apart. Rows are interleaved (order flips
every repeat) and ratios are of medians: the machine is shared and noisy. Ray runs its workers at
nice 15 (``worker_niceness``), so the plain rows run at nice 15 too: on a busy box a nice-0 row
would otherwise win by priority, not by code. The generator is real: prepare + 4 Ray Train steps
of the default 32x32 config (channels [32, 64, 64]) in ``--run DIR`` (reused when complete;
default: a cached folder in the temp dir). Throughput does not depend on training quality.

    .venv/bin/python bench/sampling.py --quick          # ~2-3 min (+ ~1.5 min once, for the run)
    .venv/bin/python bench/sampling.py [--part overhead|scaling|variants] [--run DIR] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from raysynth.config import apply_override, load_config
from raysynth.artifacts import Layout
from raysynth.pipeline import run_stage
from raysynth.runtime import ensure_ray

# (samples, steps, repeats) per part: all parts ~11 min on 2 cores at moderate load (each part <= 5 min).
SIZES = {"quick": {"overhead": (128, 5, 2), "scaling": (128, 5, 1), "variants": (32, 5, 2), "bf16": (64, 5, 1),
                   "stage": (128, 5, 1)},
         "full": {"overhead": (512, 10, 3), "scaling": (512, 10, 2), "variants": (64, 10, 3), "bf16": (256, 10, 3),
                  "stage": (512, 10, 3)}}
STAGE_GENERATORS = 4
WORKER_NICENESS = 15  # Ray's default ``worker_niceness`` (its C++ config): Ray workers run at nice 15
RUN_OVERRIDES = ["cv.folds=2", "diffusion.train_steps=4", "diffusion.checkpoint_every=4", "diffusion.log_every=2",
                 "diffusion.parallel_folds=false", "diffusion.max_train_images=64"]


# ---- shared by the benches of issue 9 (training.py and memory.py import these) ---------------------
def machine() -> dict:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("Model name")), platform.processor())
    import ray

    return {"cpu": model, "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "loadavg_1min_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def bench_config(*extra: str):
    return load_config("default", overrides=[*RUN_OVERRIDES, *extra])


def start_ray(cfg) -> float:
    """Start (or join) Ray; returns the seconds it took (reported apart, never inside a row)."""
    t0 = time.perf_counter()
    ensure_ray(cfg)
    return time.perf_counter() - t0


def ensure_run(run: Path | None, cfg) -> Layout:
    """A run folder with prepared data and fold 0's trained generator (made here if missing)."""
    from raysynth.artifacts import generator_digest as digest

    layout = Layout.at(run or Path(tempfile.gettempdir()) / f"raysynth-bench9-{digest(cfg)}")
    if not (layout.ddpm(0) / "config.json").is_file():
        log(f"making a run in {layout.root}: prepare + {cfg.diffusion.train_steps} Ray Train steps of fold 0")
        run_stage("prepare", cfg, layout)
        run_stage("train", cfg, layout, folds=[0])
    return layout


def scratch_layout(layout: Layout) -> Layout:
    """A fresh output root that sees ``layout``'s prepared data and generators (symlinks)."""
    root = Path(tempfile.mkdtemp(prefix="raysynth-bench9-out-"))
    for name in ("prepared", "ddpm"):
        (root / name).symlink_to(layout.root / name)
    return Layout.at(root)


def multi_generator_layout(layout: Layout, generators: int) -> Layout:
    """An output root whose ``ddpm/fold_0 .. fold_{generators-1}`` all link to ``layout``'s fold 0."""
    root = Path(tempfile.mkdtemp(prefix="raysynth-bench9-multi-"))
    (root / "prepared").symlink_to(layout.root / "prepared")
    (root / "ddpm").mkdir()
    for k in range(generators):
        (root / "ddpm" / f"fold_{k}").symlink_to(layout.ddpm(0))
    return Layout.at(root)


def interleaved(rows: dict, reps: int) -> dict[str, list]:
    """Run every row ``reps`` times, flipping the order each repeat; returns each row's results."""
    out: dict[str, list] = {k: [] for k in rows}
    for rep in range(reps):
        for name in (list(rows) if rep % 2 == 0 else list(rows)[::-1]):
            out[name].append(rows[name]())
            log(f"  rep {rep + 1}/{reps} {name}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                                  for k, v in out[name][-1].items()}))
    return out


@contextlib.contextmanager
def worker_niceness():
    """Run a plain row at Ray's worker niceness (Linux niceness is per thread; 1 torch thread runs inline)."""
    old = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, max(old, WORKER_NICENESS))
    try:
        yield
    finally:
        with contextlib.suppress(PermissionError):  # not root: the driver stays niced
            os.setpriority(os.PRIO_PROCESS, 0, old)


def med(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def log(message: str) -> None:
    print(message, flush=True)


def base_argparser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, ~1-2 minutes")
    p.add_argument("--run", type=Path, help="a raysynth output root with prepared data and ddpm/fold_0 (made if missing)")
    p.add_argument("--reps", type=int, help="override the number of interleaved repeats")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


# ---- the rows --------------------------------------------------------------------------------------
def requests_for(cfg, n: int, generators: int = 1) -> list[dict]:
    """Shard requests for ``n`` samples split over ``generators`` generators (folds 0, 1, ...) and 2 classes."""
    from raysynth.stages.sample import plan_requests

    out = []
    for k in range(generators):
        m = n // generators + (1 if k < n % generators else 0)
        out += [{**r, "fold": k, "fraction": 1.0} for r in plan_requests({0: m // 2, 1: m - m // 2}, {}, cfg.sampling.shard_size)]
    return out


def ray_row(cfg, layout: Layout, requests: list[dict], actors: int, cpus: int, per_generator: bool = False,
            bf16: bool = False) -> dict:
    """The sample stage's Ray Data path; shard files' mtimes tell when each shard was written.
    ``per_generator``: one pipeline per generator, one after the other (the stage before issue 9)."""
    from raysynth.stages import sample

    cfg = cfg.replace(sampling=cfg.sampling.replace(min_actors=actors, max_actors=actors, cpus_per_actor=cpus,
                                                    cpu_bf16=bf16))
    out = scratch_layout(layout)
    folds = sorted({r["fold"] for r in requests})
    try:
        t0, t0_wall = time.perf_counter(), time.time()
        for group in ([[r for r in requests if r["fold"] == k] for k in folds] if per_generator else [requests]):
            sample._run_requests(cfg, out, group)
        wall, end_wall = time.perf_counter() - t0, time.time()
        written = sorted(f.stat().st_mtime for k in folds for f in out.synthetic(k).glob("part-*.parquet"))
    finally:
        shutil.rmtree(out.root, ignore_errors=True)
    n = sum(r["hi"] - r["lo"] for r in requests)
    row = {"seconds": wall, "samples_per_s": n / wall}
    if len(written) == len(requests) > actors and len(folds) == 1:
        first = max(r["hi"] - r["lo"] for r in requests)  # shards have equal sizes here
        rate = (n - actors * first) / max(written[-1] - written[actors - 1], 1e-9)
        # first shard written, the rate after it, and how long rows took to reach the driver after the last file
        row.update({"first_shard_s": written[0] - t0_wall, "after_first_samples_per_s": rate,
                    "startup_est_s": written[0] - t0_wall - first / rate * actors, "delivery_s": end_wall - written[-1]})
    return row


@worker_niceness()
def plain_row(cfg, layout: Layout, requests: list[dict], channels_last: bool = False, bf16: bool = False) -> dict:
    """The baseline: load the model, then ``process.sample`` over the same batches and seeds."""
    from raysynth.diffusion.checkpoint import load_generator
    from raysynth.diffusion.sampler import sample_seed

    torch.set_num_threads(1)
    s, t0 = cfg.sampling, time.perf_counter()
    shape, n, fold = (1,) + (cfg.data.image_size,) * cfg.data.dims, 0, None
    for r in requests:
        if r.get("fold", 0) != fold:  # requests come grouped by generator
            fold = r.get("fold", 0)
            model, process, _ = load_generator(layout, fold)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
        for lo in range(r["lo"], r["hi"], s.batch_size):
            idx = range(lo, min(lo + s.batch_size, r["hi"]))
            gens = [torch.Generator().manual_seed(sample_seed(s.seed, fold, r["label"], j)) for j in idx]
            labels = torch.full((len(idx),), r["label"], dtype=torch.long)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                n += len(process.sample(model, labels, shape, s.sampler, s.steps, gens))
    wall = time.perf_counter() - t0
    return {"seconds": wall, "samples_per_s": n / wall}


@worker_niceness()
def inproc_row(cfg, layout: Layout, requests: list[dict]) -> dict:
    """raysynth's ShardSampler (generate + checksums + Parquet), called here without Ray."""
    from raysynth.diffusion.sampler import ShardSampler

    out = scratch_layout(layout)
    try:
        t0 = time.perf_counter()
        sampler = ShardSampler(cfg.to_dict(), str(out.root), 0, 1)
        out.synthetic(0).mkdir(parents=True, exist_ok=True)
        for r in requests:
            sampler.write_shard(r["label"], r["lo"], r["hi"])
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out.root, ignore_errors=True)
    return {"seconds": wall, "samples_per_s": sum(r["hi"] - r["lo"] for r in requests) / wall}


CHILD = """import json, sys; sys.path.insert(0, {bench!r}); import sampling
from raysynth.config import from_dict; from raysynth.artifacts import Layout
print(json.dumps(sampling.plain_row(from_dict(json.loads({cfg!r})), Layout.at({root!r}), json.loads({reqs!r}))))"""


def procs_row(cfg, layout: Layout, requests: list[dict], procs: int) -> dict:
    """The machine's own scaling, no Ray: ``procs`` fresh processes (imports, model load, 1 thread,
    nice 15, like actors) run the plain loop on a share of the shards each, at the same time."""
    t0 = time.perf_counter()
    running = [subprocess.Popen([sys.executable, "-c", CHILD.format(
        bench=str(Path(__file__).parent), cfg=json.dumps(cfg.to_dict()), root=str(layout.root),
        reqs=json.dumps(requests[i::procs]))], stdout=subprocess.DEVNULL) for i in range(procs)]
    if any(proc.wait() for proc in running):
        raise RuntimeError("a plain sampling process failed")
    wall = time.perf_counter() - t0
    return {"seconds": wall, "samples_per_s": sum(r["hi"] - r["lo"] for r in requests) / wall}


def bf16_error(cfg, layout: Layout, n: int = 16) -> dict:
    """Mean and max |bf16 - fp32| of the same seeds' samples (values in [-1, 1])."""
    from raysynth.diffusion.checkpoint import load_generator

    model, process, _ = load_generator(layout, 0)
    shape, labels = (1,) + (cfg.data.image_size,) * cfg.data.dims, torch.arange(n) % 2
    out = []
    for bf16 in (False, True):
        gens = [torch.Generator().manual_seed(j) for j in range(n)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(process.sample(model, labels, shape, cfg.sampling.sampler, cfg.sampling.steps, gens))
    diff = (out[1] - out[0]).abs()
    return {"mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max())}


def part(report: dict, key: str, cfg, size: tuple, args, rows, ratios: dict, generators: int = 1) -> None:
    n, steps, reps = args.samples or size[0], args.steps or size[1], args.reps or size[2]
    c = apply_override(cfg, f"sampling.steps={steps}")
    if key == "scaling":
        c = apply_override(c, f"sampling.shard_size={max(1, n // 8)}")
    reqs = requests_for(c, n, generators)
    log(f"{key}: {n} samples, {c.sampling.sampler} {steps} steps, batch {c.sampling.batch_size}, {len(reqs)} shards")
    res = interleaved({name: (lambda f=f: f(c, reqs)) for name, f in rows.items()}, reps)
    speed = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in res.items()}
    report[key] = {"samples": n, "steps": steps, "rows": res, "median_samples_per_s": speed,
                   "ratios": {name: speed[a] / speed[b] for name, (a, b) in ratios.items()}}
    for name, v in speed.items():
        log(f"  {key}/{name:<20} {v:8.2f} samples/s (median)")
    for name, v in report[key]["ratios"].items():
        log(f"  ratio {name}: {v:.3f}")


def main(argv=None) -> int:
    p = base_argparser(__doc__)
    p.add_argument("--part", choices=["overhead", "scaling", "variants", "bf16", "stage", "all"], default="all")
    p.add_argument("--samples", type=int, help="override the samples of the parts run")
    p.add_argument("--steps", type=int, help="override the sampling steps of the parts run")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    sizes = SIZES["quick" if args.quick else "full"]
    cfg = bench_config()
    report = {"machine": machine(), "ray_startup_s": start_ray(cfg)}
    lay = ensure_run(args.run, cfg)
    log(f"ray startup {report['ray_startup_s']:.1f}s (excluded from every row); run {lay.root}")
    if args.part in ("overhead", "all"):
        part(report, "overhead", cfg, sizes["overhead"], args,
             {"ray_1actor": lambda c, r: ray_row(c, lay, r, 1, 1), "plain": lambda c, r: plain_row(c, lay, r),
              "inproc": lambda c, r: inproc_row(c, lay, r)},
             {"ray_over_plain": ("ray_1actor", "plain"), "inproc_over_plain": ("inproc", "plain"),
              "ray_over_inproc": ("ray_1actor", "inproc")})
        r = report["overhead"]["ratios"]["ray_over_plain"]
        log(f"target 1 (ray/plain >= 0.95, >= 512 samples): {'MET' if r >= 0.95 else 'MISSED'} ({r:.3f} at "
            f"{report['overhead']['samples']} samples, {report['overhead']['steps']} steps)")
    if args.part in ("scaling", "all"):
        part(report, "scaling", cfg, sizes["scaling"], args,
             {"1actor_1cpu": lambda c, r: ray_row(c, lay, r, 1, 1), "2actors_1cpu": lambda c, r: ray_row(c, lay, r, 2, 1),
              "1actor_2cpu": lambda c, r: ray_row(c, lay, r, 1, 2), "noray_1proc": lambda c, r: procs_row(c, lay, r, 1),
              "noray_2procs": lambda c, r: procs_row(c, lay, r, 2)},
             {"2actors_over_1": ("2actors_1cpu", "1actor_1cpu"), "1actor_2threads_over_1": ("1actor_2cpu", "1actor_1cpu"),
              "noray_2procs_over_1": ("noray_2procs", "noray_1proc")})
        r = report["scaling"]["ratios"]["2actors_over_1"]
        log(f"target 2 (2 actors / 1 >= 1.7): {'MET' if r >= 1.7 else 'MISSED'} ({r:.3f})")
    if args.part in ("variants", "all"):
        part(report, "variants", cfg, sizes["variants"], args,
             {"fp32": lambda c, r: plain_row(c, lay, r), "channels_last": lambda c, r: plain_row(c, lay, r, True),
              "bf16_autocast": lambda c, r: plain_row(c, lay, r, bf16=True),
              "channels_last_bf16": lambda c, r: plain_row(c, lay, r, True, True)},
             {f"{k}_over_fp32": (k, "fp32") for k in ("channels_last", "bf16_autocast", "channels_last_bf16")})
        report["variants"]["bf16_vs_fp32"] = err = bf16_error(apply_override(cfg, "sampling.steps=10"), lay)
        log(f"  bf16 vs fp32 samples (same seeds, 10 steps): {json.dumps(err)}")
    if args.part in ("bf16", "all"):
        part(report, "bf16", cfg, sizes["bf16"], args,
             {"ray_fp32": lambda c, r: ray_row(c, lay, r, 1, 1), "ray_bf16": lambda c, r: ray_row(c, lay, r, 1, 1, bf16=True),
              "plain_fp32": lambda c, r: plain_row(c, lay, r), "plain_bf16": lambda c, r: plain_row(c, lay, r, bf16=True)},
             {"ray_bf16_over_ray_fp32": ("ray_bf16", "ray_fp32"), "plain_bf16_over_plain_fp32": ("plain_bf16", "plain_fp32")})
    if args.part in ("stage", "all"):
        multi = multi_generator_layout(lay, STAGE_GENERATORS)
        try:
            part(report, "stage", cfg, sizes["stage"], args,
                 {"ray_one_pipeline": lambda c, r: ray_row(c, multi, r, 1, 1),
                  "ray_per_generator": lambda c, r: ray_row(c, multi, r, 1, 1, per_generator=True),
                  "plain": lambda c, r: plain_row(c, multi, r)},
                 {"one_pipeline_over_plain": ("ray_one_pipeline", "plain"),
                  "per_generator_over_plain": ("ray_per_generator", "plain"),
                  "one_pipeline_over_per_generator": ("ray_one_pipeline", "ray_per_generator")},
                 generators=STAGE_GENERATORS)
        finally:
            shutil.rmtree(multi.root, ignore_errors=True)
        r = report["stage"]["ratios"]["one_pipeline_over_plain"]
        log(f"target 1 on a {STAGE_GENERATORS}-generator stage (ray/plain >= 0.95): {'MET' if r >= 0.95 else 'MISSED'} "
            f"({r:.3f} at {report['stage']['samples']} samples, {report['stage']['steps']} steps)")
    report["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
