"""Stage ``study``: the Ray Tune grid of downstream CNNs, condition x real fraction x fold x seed.

A condition is an arm, and for synthetic arms one ratio (``design.conditions``). Every condition
of a (fraction, fold, seed) cell reads the same ``splits.json``, the same real subset
(``subsets.json``) and the same seed, so two conditions differ only in their training data: the
pairing the statistics rely on. Test folds are the fold's whole real test part, for every fraction.

Each trial asks Tune for ``study.cpus_per_trial`` / ``gpus_per_trial``; a failed trial is retried
``study.max_failures`` times. Each finished trial is written at once to
``OUT/study/trials/<key>.json`` by a driver-side Tune callback (the trained network goes to
``OUT/study/models/<key>.pt``, so the robustness stage can evaluate it without retraining) that also logs progress, so a study
that dies half-way resumes with only the missing trials. The artifact is
``OUT/study/results.parquet`` (one row per trial) and ``predictions.parquet`` (per test record),
gathered from those files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

import pyarrow as pa
import ray.tune as tune

from raysynth.artifacts import (
    PREDICTIONS,
    RESULTS,
    STUDY_JSON,
    TRIAL_FIELDS,
    Layout,
    dropped_ids,
    finished_trials,
    fraction_tag,
    read_json,
    read_manifest,
    read_prepared,
    read_subsets,
    study_digest,
    trial_key,
)
from raysynth.config import Config
from raysynth.console import Progress
from raysynth.design import Condition, conditions
from raysynth.downstream.trial import run_trial
from raysynth.errors import StageError
from raysynth.io import write_json, write_table
from raysynth.runtime import ensure_ray

log = logging.getLogger(__name__)

HEADLINE_METRICS = ("balanced_accuracy", "auc", "mean_dice")


def study_grid(cfg: Config, splits: list[dict]) -> list[dict]:
    """Every trial, ordered so that whole (fraction, fold, seed) cells finish together."""
    return [{"arm": c.arm, "ratio": c.ratio, "fraction": float(p), "fold": int(s["fold"]), "seed": int(seed)}
            for p in sorted(cfg.study.real_fractions, reverse=True) for s in splits for seed in cfg.study.seeds
            for c in conditions(cfg)]


def run_study(cfg: Config, layout: Layout, force: bool = False) -> Path:
    """Run the missing trials of the grid and gather ``results.parquet``. Returns its path."""
    records, fingerprint, splits = read_prepared(layout, cfg)
    st = cfg.study
    trials_dir = layout.study_trials
    if force:
        shutil.rmtree(layout.study, ignore_errors=True)
        shutil.rmtree(layout.ray_storage / "study", ignore_errors=True)
    digest = study_digest(cfg)
    read_subsets(layout, cfg)  # every fraction the grid asks for is on file (prepare writes them)
    grid = study_grid(cfg, splits)
    missing = sorted({f"{g['fold']}{fraction_tag(g['fraction'])}" for g in grid if Condition(g["arm"], g["ratio"]).uses_synthetic
                      and read_manifest(layout, g["fold"], g["fraction"], cfg) is None})
    if missing:
        raise StageError(f"study: synthetic arms need synthetic data for folds {missing}; run `raysynth sample` first")
    done = {p.stem for p in trials_dir.glob("*.json") if read_json(p).get("digest") == digest} if trials_dir.is_dir() else set()
    pending = [g for g in grid if trial_key(**g) not in done]
    log.info("study: %d trials in the grid (%d conditions x %d real fractions x %d folds x %d seeds), %d to run",
             len(grid), len(conditions(cfg)), len(st.real_fractions), len(splits), len(st.seeds), len(pending))
    if pending:
        ensure_ray(cfg)
        dropped = sorted(dropped_ids(layout, cfg))
        trainable = tune.with_resources(run_trial, {"cpu": st.cpus_per_trial, "gpu": st.gpus_per_trial})
        writer = TrialWriter(trials_dir, digest, len(pending))
        tuner = tune.Tuner(
            trainable,
            param_space={
                "cfg": cfg.to_dict(), "root": str(layout.root), "dropped": dropped,
                "trial": tune.grid_search(pending),
            },
            tune_config=tune.TuneConfig(trial_name_creator=lambda t: trial_key(**t.config["trial"]),
                                        trial_dirname_creator=lambda t: trial_key(**t.config["trial"])),
            run_config=tune.RunConfig(
                name=f"study_{digest}", storage_path=str(layout.ray_storage),
                failure_config=tune.FailureConfig(max_failures=st.max_failures),
                callbacks=[writer], verbose=0,
            ),
        )
        with Progress("study", len(pending), "trials") as writer.bar:
            results = tuner.fit()
        errors = [r.error for r in results if r.error is not None]
        if errors:
            raise StageError(f"study: {len(errors)} trial(s) failed after {st.max_failures} retries; "
                             f"{len(results) - len(errors)} finished and are kept; first error: {errors[0]}")
    return gather_results(cfg, layout, fingerprint)


class TrialWriter(tune.Callback):
    """Driver-side Tune callback: persist each finished trial at once, and count it on ``bar``."""

    def __init__(self, folder: Path, digest: str, total: int, bar: Optional[Progress] = None) -> None:
        self.folder, self.digest, self.total, self.done, self.failed = folder, digest, total, 0, 0
        self.start, self.bar = time.time(), bar

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        payload = json.loads(trial.last_result["payload"])
        payload["digest"] = self.digest
        write_json(self.folder / f"{trial_key(**{k: payload[k] for k in TRIAL_FIELDS})}.json", payload)
        self.done += 1
        m = payload["metrics"]
        headline = ", ".join(f"{k} {m[k]:.3f}" for k in HEADLINE_METRICS if isinstance(m.get(k), (int, float)))
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        log.debug("study: %d/%d trials done (%.0fs, ~%.0fs left): %s, real %.0f%%, fold %d, seed %d: %s",
                  self.done, self.total, elapsed, eta, payload["condition"], 100 * payload["fraction"],
                  payload["fold"], payload["seed"], headline)
        if self.bar is not None:
            self.bar.note(f"last: {payload['condition']}, fold {payload['fold']}: {headline}"
                          + (f"; {self.failed} failed" if self.failed else ""))
            self.bar.update()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        log.warning("study: trial %s failed for good (after retries); %d failed so far", trial, self.failed)
        if self.bar is not None:
            self.bar.update()


def gather_results(cfg: Config, layout: Layout, fingerprint: dict) -> Path:
    """One row per trial in ``results.parquet``; one row per test record and trial in
    ``predictions.parquet`` (classification: true label and class probabilities)."""
    trials = finished_trials(cfg, layout)
    if not trials:
        raise StageError("study: no finished trials to gather")
    digest = study_digest(cfg)
    rows, preds = [], []
    for t in trials:
        key = {"condition": t["condition"], "arm": t["arm"], "ratio": t["ratio"], "real_fraction": t["real_fraction"],
               "fold": t["fold"], "repeat": t["repeat"], "seed": t["seed"]}
        scalar = {k: float(v) for k, v in t["metrics"].items() if isinstance(v, (int, float))}
        rows.append({**key, "n_real": t["n_real"], "n_synthetic": t["n_synthetic"], "n_test": t["n_test"],
                     "seconds": t["seconds"], **scalar, "metrics_json": json.dumps(t["metrics"])})
        if t.get("y_prob") is not None:
            for rid, y, p in zip(t["test_ids"], t["y_true"], t["y_prob"]):
                preds.append({**key, "id": rid, "y_true": int(y), "y_prob": [float(v) for v in p]})
    rows.sort(key=lambda r: (-r["real_fraction"], r["fold"], r["seed"], r["condition"]))
    layout.study.mkdir(parents=True, exist_ok=True)
    write_table(pa.Table.from_pylist(rows), layout.study / RESULTS)
    if preds:
        write_table(pa.Table.from_pylist(preds), layout.study / PREDICTIONS)
    write_json(layout.study / STUDY_JSON, {
        "digest": digest, "num_trials": len(rows), "arms": cfg.study.arms,
        "conditions": [c.name for c in conditions(cfg)], "real_fractions": cfg.study.real_fractions,
        "seeds": cfg.study.seeds, "class_names": fingerprint["class_names"]})
    log.info("study: %d trial results in %s", len(rows), layout.study / RESULTS)
    return layout.study / RESULTS
