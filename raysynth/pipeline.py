"""The whole flow, stage after stage; each stage skips the work that is already complete."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from raysynth.config import Config
from raysynth.layout import Layout
from raysynth.storage import syncs_output

log = logging.getLogger(__name__)

STAGES = ("prepare", "train", "sample", "quality", "study", "robustness", "report")


@syncs_output  # an output URI: pull its staging folder before the stage, push it after
def run_stage(name: str, cfg: Config, layout: Layout, *, force: bool = False, folds: Optional[list[int]] = None,
              num_samples: Optional[int] = None) -> Any:
    """Run one stage by name; the CLI and the Ray jobs both come through here."""
    if name == "prepare":
        from raysynth.data.prepare import prepare

        return prepare(cfg, layout, force=force)
    if name == "train":
        from raysynth.diffusion.train import train_generators

        return train_generators(cfg, layout, folds=folds, force=force)
    if name == "sample":
        from raysynth.diffusion.sample import sample_synthetic

        return sample_synthetic(cfg, layout, folds=folds, num_samples=num_samples, force=force)
    if name == "quality":
        from raysynth.quality.stage import assess_quality

        return assess_quality(cfg, layout, force=force)
    if name == "study":
        from raysynth.study.cv import run_study

        return run_study(cfg, layout, force=force)
    if name == "robustness":
        from raysynth.study.robustness import run_robustness

        return run_robustness(cfg, layout, force=force)
    if name == "tune":  # optional, before train: search gamma and the learning rate
        from raysynth.diffusion.tune import search

        return search(cfg, layout, force=force)
    if name == "report":
        from raysynth.study.report import write_report

        return write_report(cfg, layout)
    raise ValueError(f"unknown stage {name!r}; choose one of {[*STAGES, 'tune']}")


def run_pipeline(cfg: Config, layout: Layout, *, force: bool = False) -> dict[str, Any]:
    """prepare -> train -> sample -> quality -> study -> robustness -> report. Returns the report and timings."""
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name in STAGES:
        t0 = time.time()
        log.info("== %s", name)
        results[name] = run_stage(name, cfg, layout, force=force)
        timings[name] = round(time.time() - t0, 1)
        log.info("== %s done in %.1fs", name, timings[name])
    return {"report": results["report"], "quality": results["quality"], "timings": timings}
