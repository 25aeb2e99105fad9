"""Issue 9, item 3: do ``OMP_WAIT_POLICY=PASSIVE`` or a short ``GOMP_SPINCOUNT`` help torch's CPU threads?

torch's CPU thread pool is OpenMP (libgomp in the pip wheels). With the policy unset, a thread that
reaches a barrier first spins for a while before it sleeps; ``PASSIVE`` makes it sleep at once.
libgomp reads the variable when it is loaded (``import torch``), so each row runs in a fresh
process with the variable set or unset in its environment before start, the way a Ray worker gets
it from the driver that starts a local Ray (``raysynth.runtime.openmp_env``).

Rows: threads (1, 2) x policy (``unset``; ``PASSIVE``; ``spin1k`` / ``spin10k``: GOMP_SPINCOUNT=1000 /
10000, spin that often then sleep; libgomp's default is 300000) x load (``idle``: nothing of ours beside it;
``loaded``: two busy-loop processes at the same niceness, one per core, like other jobs on this
shared 2-core machine). Each row times forward passes of the default 32x32 denoiser (channels
[32, 64, 64], batch 32, no grad: what a sampling step does) after a warm-up, and reads the
process's CPU time: spinning shows as CPU time above wall time x useful threads. Rows interleave
(the order flips every repeat); medians per row, and each policy's time over unset's at the same
threads and load.

    .venv/bin/python bench/omp_wait.py [--quick] [--reps N] [--json F]
    .venv/bin/python bench/omp_wait.py --threads 2 --policies unset spin1k PASSIVE --reps 4   # ~5 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, statistics, time
import torch
from raysynth.config import DiffusionConfig
from raysynth.diffusion.networks import build_denoiser
torch.set_num_threads({threads})
torch.manual_seed(0)
model = build_denoiser(DiffusionConfig(), dims=2, in_channels=1, image_size=32, num_classes=2).eval()
x, t, y = torch.randn(32, 1, 32, 32), torch.full((32,), 500), torch.zeros(32, dtype=torch.long)
times = []
with torch.inference_mode():
    for i in range({warmup} + {passes}):
        if i == {warmup}:
            cpu0 = sum(os.times()[:2])
        t0 = time.perf_counter()
        model(x, t, y)
        times.append(time.perf_counter() - t0)
cpu = sum(os.times()[:2]) - cpu0
timed = times[{warmup}:]
print(json.dumps({{"ms_per_forward": 1000 * statistics.median(timed), "wall_s": sum(timed), "cpu_s": cpu,
                  "cpu_per_wall": cpu / sum(timed), "policy_seen": os.environ.get("OMP_WAIT_POLICY")}}))
"""

HOG = "while True: pass"
POLICIES = {"unset": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"},
            "spin1k": {"GOMP_SPINCOUNT": "1000"}}
NICENESS = 15  # Ray's worker_niceness: the rows and the hogs both run at it


def row(threads: int, policy: str, loaded: bool, warmup: int, passes: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(POLICIES[policy])
    nice = lambda: os.nice(NICENESS)  # noqa: E731
    hogs = [subprocess.Popen([sys.executable, "-c", HOG], preexec_fn=nice) for _ in range(2 if loaded else 0)]
    try:
        out = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads, warmup=warmup, passes=passes)],
                             env=env, capture_output=True, text=True, check=True, preexec_fn=nice)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 repeats of 6 passes")
    p.add_argument("--reps", type=int)
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--policies", nargs="+", default=["unset", "PASSIVE"], choices=list(POLICIES))
    p.add_argument("--loads", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    args = p.parse_args(argv)
    reps, (warmup, passes) = args.reps or (2 if args.quick else 3), ((2, 6) if args.quick else (3, 15))
    names = [(th, pol, ld == "loaded") for ld in args.loads for th in args.threads for pol in args.policies]
    res: dict[str, list] = {}
    report = {"loadavg_1min_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"), "rows": res}
    for rep in range(reps):
        for th, pol, ld in (names if rep % 2 == 0 else names[::-1]):
            key = f"{'loaded' if ld else 'idle'}/{th}thr/{pol}"
            res.setdefault(key, []).append(row(th, pol, ld, warmup, passes))
            print(f"rep {rep + 1}/{reps} {key}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res[key][-1].items()})}",
                  flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("ms_per_forward", "cpu_per_wall")} for k, v in res.items()}
    report["medians"] = med
    report["time_over_unset"] = {}
    for ld in args.loads:
        for th in args.threads:
            base = med.get(f"{ld}/{th}thr/unset")
            for pol in args.policies:
                m = med[f"{ld}/{th}thr/{pol}"]
                ratio = m["ms_per_forward"] / base["ms_per_forward"] if base else float("nan")
                report["time_over_unset"][f"{ld}/{th}thr/{pol}"] = ratio
                print(f"{ld:>6} {th} thread(s) {pol:<8} {m['ms_per_forward']:8.1f} ms/forward (cpu/wall "
                      f"{m['cpu_per_wall']:.2f}); time / unset {ratio:.3f}")
    report["loadavg_1min_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
