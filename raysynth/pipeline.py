"""The whole flow, stage after stage, and the policy around it.

The pipeline owns the stage registry, what ``--force`` means for each stage, and the privacy
gate's consequence: a failed gate raises :class:`~raysynth.errors.PrivacyGateError` (the CLI's
exit status 3) for library callers and the CLI alike. Each stage skips the work that is already
complete.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from raysynth.artifacts import QUALITY_JSON, RESULTS, ROBUSTNESS_JSON, TUNE_JSON, Layout
from raysynth.config import Config
from raysynth.errors import PrivacyGateError
from raysynth.stages.autoencoder import train_autoencoders
from raysynth.stages.prepare import prepare
from raysynth.stages.quality import assess_quality
from raysynth.stages.report import write_report
from raysynth.stages.robustness import run_robustness
from raysynth.stages.sample import sample_synthetic
from raysynth.stages.study import run_study
from raysynth.stages.train import train_generators
from raysynth.stages.tune import search
from raysynth.storage import syncs_output

log = logging.getLogger(__name__)

STAGES = ("prepare", "autoencoder", "train", "sample", "quality", "study", "robustness", "report")
"""The main flow, in order (``autoencoder`` in latent space only: :func:`applies`). ``tune`` is
optional and runs before train, on its own."""

_RUNNERS: dict[str, Callable[..., Any]] = {
    "prepare": lambda cfg, layout, force, folds, num_samples: prepare(cfg, layout, force=force),
    "autoencoder": lambda cfg, layout, force, folds, num_samples: train_autoencoders(cfg, layout, folds=folds,
                                                                                    force=force),
    "train": lambda cfg, layout, force, folds, num_samples: train_generators(cfg, layout, folds=folds, force=force),
    "sample": lambda cfg, layout, force, folds, num_samples: sample_synthetic(cfg, layout, folds=folds,
                                                                             num_samples=num_samples, force=force),
    "quality": lambda cfg, layout, force, folds, num_samples: assess_quality(cfg, layout, force=force),
    "study": lambda cfg, layout, force, folds, num_samples: run_study(cfg, layout, force=force),
    "robustness": lambda cfg, layout, force, folds, num_samples: run_robustness(cfg, layout, force=force),
    "report": lambda cfg, layout, force, folds, num_samples: write_report(cfg, layout, force=force),
    "tune": lambda cfg, layout, force, folds, num_samples: search(cfg, layout, force=force),
}


_ARTIFACTS: dict[str, Callable[[Layout], Path]] = {
    "prepare": lambda layout: layout.prepared,
    "autoencoder": lambda layout: layout.root / "autoencoder",
    "train": lambda layout: layout.root / "ddpm",
    "sample": lambda layout: layout.root / "synthetic",
    "quality": lambda layout: layout.quality / QUALITY_JSON,
    "study": lambda layout: layout.study / RESULTS,
    "robustness": lambda layout: layout.robustness / ROBUSTNESS_JSON,
    "report": lambda layout: layout.report / "report.html",
    "tune": lambda layout: layout.tune / TUNE_JSON,
}


def applies(name: str, cfg: Config) -> bool:
    """Whether the pipeline runs stage ``name`` for ``cfg``: the autoencoder only in latent space."""
    return name != "autoencoder" or cfg.diffusion.space == "latent"


def artifact_of(name: str, layout: Layout) -> str:
    """Where stage ``name`` writes, for its end line: a local path, or the URI's counterpart."""
    path = _ARTIFACTS[name](layout)
    return f"{layout.remote.rstrip('/')}/{path.relative_to(layout.root).as_posix()}" if layout.remote else str(path)


def run_stage(name: str, cfg: Config, layout: Layout, *, force: bool = False, folds: Optional[list[int]] = None,
              num_samples: Optional[int] = None, enforce_gate: bool = True) -> Any:
    """Run one stage by name; the CLI and the Ray jobs both come through here. Logs one line when
    it starts and one when it ends (its wall time and its artifact, or that it failed).

    ``enforce_gate``: after ``quality``, raise :class:`PrivacyGateError` when the gate failed
    (the pipeline defers that to the end of the run, so the report still gets written)."""
    if name not in _RUNNERS:
        raise ValueError(f"unknown stage {name!r}; choose one of {[*STAGES, 'tune']}")
    t0 = time.time()
    log.info("== %s", name)
    try:
        result = _run_synced(name, cfg, layout, force=force, folds=folds, num_samples=num_samples)
    except BaseException:
        log.error("== %s failed after %.1fs", name, time.time() - t0)
        raise
    log.info("== %s done in %.1fs: %s", name, time.time() - t0, artifact_of(name, layout))
    if name == "quality" and enforce_gate:
        enforce_privacy_gate(result)
    return result


@syncs_output  # an output URI: pull its staging folder before the stage, push it after
def _run_synced(name: str, cfg: Config, layout: Layout, *, force: bool, folds: Optional[list[int]],
                num_samples: Optional[int]) -> Any:
    return _RUNNERS[name](cfg, layout, force, folds, num_samples)


def run_pipeline(cfg: Config, layout: Layout, *, force: bool = False) -> dict[str, Any]:
    """prepare -> (autoencoder) -> train -> sample -> quality -> study -> robustness -> report. Returns the report and timings.

    Raises :class:`PrivacyGateError` at the end, after the report, when the privacy gate failed."""
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name in (n for n in STAGES if applies(n, cfg)):
        if name == ("autoencoder" if applies("autoencoder", cfg) else "train"):
            log_estimate(cfg, layout, force)
        t0 = time.time()
        results[name] = run_stage(name, cfg, layout, force=force, enforce_gate=False)
        timings[name] = round(time.time() - t0, 1)
    outcome = {"report": results["report"], "quality": results["quality"], "timings": timings}
    enforce_privacy_gate(results["quality"], report=layout.report / "report.md", outcome=outcome)
    return outcome


def log_estimate(cfg: Config, layout: Layout, force: bool) -> None:
    """Before the long work: the run's time from a short calibration (:mod:`raysynth.estimate`),
    unless every generator is already trained. Never fails the run."""
    from raysynth.artifacts import generator_complete, read_fingerprint
    from raysynth.design import class_counts, generator_fractions, largest_ratio
    from raysynth.diffusion.fits import fold_slots
    from raysynth.estimate import describe, estimate_run
    from raysynth.runtime import ensure_ray

    folds = range(cfg.cv.folds * cfg.cv.repeats)
    if not force and all(generator_complete(cfg, layout, k, p) for k in folds for p in generator_fractions(cfg)):
        return
    try:
        fingerprint = read_fingerprint(layout, cfg)
        share = (cfg.cv.folds - 1) / cfg.cv.folds  # a fold's training part
        counts = {i: max(1, round(n * share)) for i, n in enumerate(fingerprint.get("counts", {}).values())} or {0: 1}
        samples = sum(class_counts(cfg, counts, None, ratio=largest_ratio(cfg)).values())
        ensure_ray(cfg)
        estimate = estimate_run(cfg, fingerprint, slots=fold_slots(cfg), samples_per_generator=samples)
    except Exception as exc:  # an estimate is a courtesy: say why there is none, and go on
        log.warning("no time estimate: %s", exc)
        return
    log.info(describe(estimate))


def enforce_privacy_gate(summary: dict[str, Any], report: Any = None, outcome: Optional[dict] = None) -> None:
    """Raise :class:`PrivacyGateError` with a one-line message when the quality stage's gate failed.

    ``outcome``: the pipeline's result, kept on the error (``exc.outcome``) so a caller can still
    print the run's summary."""
    if summary.get("privacy_passed", False):
        return
    gate = summary["gate"]
    blind = [r["fold"] for r in summary["folds"] if not r["gate"].get("discriminates", True)]
    if blind and all(r["gate"]["passed"] or r["fold"] in blind for r in summary["folds"]):
        error = PrivacyGateError(
            f"privacy gate inconclusive: in fold(s) {blind} held-out real images reach NCC 1 with training images, "
            "so the gate cannot flag near-copies; look for duplicates across the split (data.duplicates=group) "
            "and see quality/ncc_hist.png" + (f"; report: {report}" if report is not None else ""))
        error.outcome = outcome
        raise error
    bad = ", ".join(f"fold {r['fold']}: {r['gate']['count']}/{r['gate']['total']} "
                    f"({100 * r['gate']['fraction']:.1f}%, held-out real {100 * r['gate'].get('reference_fraction', 0):.1f}%)"
                    for r in summary["folds"] if not r["gate"]["passed"])
    action = "dropped before the study" if gate["drop_memorised"] else "set quality.drop_memorised to drop them"
    where = f"; report: {report}" if report is not None else ""
    error = PrivacyGateError(
        f"privacy gate failed: synthetic samples with NCC above the gate threshold to a training image exceed "
        f"held-out real scans' rate by more than {100 * gate['max_memorised_fraction']:g}% ({bad}); {action}; "
        f"see quality/ncc_hist.png{where}")
    error.outcome = outcome
    raise error
