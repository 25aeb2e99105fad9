"""Wall time of the whole pipeline, stage by stage, for one or more presets (a benchmark, not a test).

    .venv/bin/python bench/pipeline_timing.py --preset smoke --preset default [--json out.json]

Each preset runs from scratch in a fresh temporary output folder with a fresh cohort cache, so
the figures include building the embedded cohort and starting Ray. Record the output in
BENCHMARKS.md with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time

from raysynth.config import load_config
from raysynth.artifacts import Layout
from raysynth.pipeline import STAGES, run_stage


def time_preset(preset: str, overrides: list[str]) -> dict:
    cfg = load_config(preset, None, overrides)
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as cache:
        os.environ["RAYSYNTH_CACHE"] = cache
        layout = Layout.at(out)
        timings = {}
        t_all = time.perf_counter()
        for stage in STAGES:
            t0 = time.perf_counter()
            result = run_stage(stage, cfg, layout)
            timings[stage] = round(time.perf_counter() - t0, 1)
            print(f"  {preset:>8} {stage:>8}: {timings[stage]:7.1f} s", flush=True)
        timings["total"] = round(time.perf_counter() - t_all, 1)
        summary = result["summary"] if isinstance(result, dict) and "summary" in result else None
    return {"preset": preset, "overrides": overrides, "seconds": timings, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", default=[], help="repeatable; default: smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = [time_preset(p, args.overrides) for p in (args.preset or ["smoke"])]
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    print("\npreset    " + "  ".join(f"{s:>8}" for s in (*STAGES, "total")))
    for r in results:
        print(f"{r['preset']:<9} " + "  ".join(f"{r['seconds'][s]:8.1f}" for s in (*STAGES, "total")))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
