"""Benchmark 4 of issue 9: peak memory of the sample stage's driver and actor, N against 10N samples.

Method. This process starts Ray once and makes (or reuses) a run with a trained fold-0 generator
(see sampling.py). For each size it starts a fresh driver process that joins that Ray instance
and runs the real sample stage (``run_stage("sample", folds=[0], num_samples=N, force=True)``:
Ray Data, one ``ShardSampler`` actor, Parquet shards, manifest, grids) into a scratch folder.
The driver's peak RSS is its own ``getrusage(RUSAGE_SELF).ru_maxrss``; the actor's is ``VmHWM``
from ``/proc/<pid>/status``, polled every 0.2 s from the driver, the actor found by its process
title (``ray::...ShardSampler...``) among descendants of this process (so other users' Ray
actors on a shared machine never count). Peak memory does not depend on the number of steps, so
few steps are used. Target: peak(10N) / peak(N) <= 1.2 for both processes.

``--part imports``: time and peak RSS of what a sampler actor imports before its first sample
(sample.py, train.load_generator, the model), in fresh processes: ``current`` (raysynth as it is:
monai and ``raysynth.stages.prepare`` imported lazily, so a 2D sampler never loads them) against
``eager`` (the same after importing those two first, as the module-level imports before issue 9 did).

    .venv/bin/python bench/memory.py --quick             # 64 vs 640 samples, ~2 min
    .venv/bin/python bench/memory.py [--run DIR] [--json F]   # 256 vs 2560 samples
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from sampling import (WORKER_NICENESS, base_argparser, bench_config, ensure_run, interleaved, log, machine, med,
                      scratch_layout, start_ray)

SIZES = {"quick": (64, 2), "full": (256, 5)}  # (N, sampling steps); rows are N and 10N


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def _status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class ActorWatcher(threading.Thread):
    """Polls /proc for ShardSampler actor processes under ``root_pid``; keeps each one's VmHWM."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.peaks_kb, self.stop = root_pid, {}, threading.Event()
        self.old = set(self.actors())  # an earlier driver's actor may still be exiting: not ours

    def actors(self):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if cmd.startswith("ray::") and "ShardSampler" in cmd and self.root_pid in _ancestors(int(entry.name)):
                    yield int(entry.name)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for pid in set(self.actors()) - self.old:
                hwm = _status_kb(pid, "VmHWM")
                if hwm:
                    self.peaks_kb[pid] = max(hwm, self.peaks_kb.get(pid, 0))


def child(args) -> None:
    """One driver: join Ray, run the sample stage for N samples, print peaks as JSON."""
    from raysynth.artifacts import Layout
    from raysynth.pipeline import run_stage

    cfg = bench_config(f"sampling.steps={args.steps}", "sampling.max_actors=1", f"ray.address={args.address}")
    start_ray(cfg)
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = scratch_layout(Layout.at(args.run))
    watcher = ActorWatcher(args.root_pid)
    watcher.start()
    t0 = time.perf_counter()
    run_stage("sample", cfg, out, folds=[0], num_samples=args.child, force=True)
    seconds = time.perf_counter() - t0
    time.sleep(0.5)
    watcher.stop.set()
    watcher.join()
    n_files = len(list(out.synthetic(0).glob("part-*.parquet")))
    print(json.dumps({"samples": args.child, "shards": n_files, "seconds": seconds,
                      "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "driver_peak_before_sampling_mb": before_kb / 1024,
                      "actor_peak_mb": max(watcher.peaks_kb.values(), default=0) / 1024,
                      "actors_seen": len(watcher.peaks_kb)}))
    import shutil

    shutil.rmtree(out.root, ignore_errors=True)


IMPORTS = r"""
import json, resource, sys, time
t0 = time.perf_counter()
if {eager}:  # what networks.py (monai) and train.py (raysynth.stages.prepare) imported at module level before
    import monai.networks.nets.diffusion_model_unet
    import raysynth.stages.prepare
from raysynth.diffusion.checkpoint import load_generator
from raysynth.diffusion.sampler import ShardSampler
from raysynth.artifacts import Layout
load_generator(Layout.at({root!r}), 0)
heavy = [m for m in ("monai", "sklearn", "scipy", "matplotlib", "nibabel", "pandas") if m in sys.modules]
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "heavy_modules": heavy}}))
"""


def imports_row(layout, eager: bool) -> dict:
    """A fresh process at Ray's worker niceness: the sampler actor's imports + load_generator."""
    out = subprocess.run([sys.executable, "-c", IMPORTS.format(eager=eager, root=str(layout.root))], capture_output=True,
                         text=True, check=True, preexec_fn=lambda: os.nice(WORKER_NICENESS))
    return json.loads(out.stdout.strip().splitlines()[-1])


def sampling_part(report: dict, layout, n: int, steps: int, reps: int) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    log(f"sampling: run {layout.root}; sizes {n} and {10 * n}, {steps} steps")
    for rep in range(reps):
        for size in (n, 10 * n):
            cmd = [sys.executable, __file__, "--child", str(size), "--address", address, "--root-pid", str(os.getpid()),
                   "--run", str(layout.root), "--steps", str(steps)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
                raise SystemExit(f"driver for {size} samples failed")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            report["rows"].append(row)
            log(f"  rep {rep + 1} {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})}")
    small = [r for r in report["rows"] if r["samples"] == n]
    big = [r for r in report["rows"] if r["samples"] == 10 * n]
    for who in ("driver", "actor"):
        a, b = max(r[f"{who}_peak_mb"] for r in small), max(r[f"{who}_peak_mb"] for r in big)
        report[f"{who}_ratio"] = b / a if a else None
        verdict = "n/a" if not a else ("MET" if b / a <= 1.2 else "MISSED")
        log(f"{who:>6}: peak {a:7.1f} MB at {n}, {b:7.1f} MB at {10 * n}: ratio {b / a if a else float('nan'):.3f} "
            f"(target <= 1.2: {verdict})")


def main(argv=None) -> int:
    p = base_argparser(__doc__)
    p.add_argument("--part", choices=["sampling", "imports", "all"], default="all")
    p.add_argument("--child", type=int, help="internal: run one driver for this many samples")
    p.add_argument("--address"), p.add_argument("--root-pid", type=int), p.add_argument("--steps", type=int)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        child(args)
        return 0
    n, steps = SIZES["quick" if args.quick else "full"]
    cfg = bench_config()
    report = {"machine": machine(), "ray_startup_s": start_ray(cfg), "steps": steps, "rows": []}
    layout = ensure_run(args.run, cfg)
    log(f"ray startup {report['ray_startup_s']:.1f}s (excluded)")
    if args.part in ("imports", "all"):
        log("imports: fresh processes at nice 15, the sampler's imports + load_generator")
        res = interleaved({"current": lambda: imports_row(layout, False), "eager": lambda: imports_row(layout, True)},
                          args.reps or (2 if args.quick else 3))
        report["imports"] = {"rows": res, **{f"median_{k}": {r: med(v, k) for r, v in res.items()}
                                             for k in ("seconds", "peak_rss_mb")}}
        log(f"  medians: {json.dumps({k: v for k, v in report['imports'].items() if k != 'rows'})}")
    if args.part in ("sampling", "all"):
        sampling_part(report, layout, n, steps, args.reps or 1)
    report["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
