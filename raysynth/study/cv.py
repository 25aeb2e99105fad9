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
import time
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import ray.tune as tune

from raysynth.config import Config, from_dict
from raysynth.errors import StageError
from raysynth.layout import Layout, fraction_tag, read_json, write_json
from raysynth.runtime import ensure_ray, set_threads
from raysynth.study.design import Condition, conditions, fraction_key

log = logging.getLogger(__name__)

HEADLINE_METRICS = ("balanced_accuracy", "auc", "mean_dice")


def trial_key(arm: str, ratio: Optional[float], fraction: float, fold: int, seed: int) -> str:
    """A file- and directory-safe name of one trial: ``synthetic-x2_p25_f0_s1``."""
    condition = arm if ratio is None else f"{arm}-x{ratio:g}"
    return f"{condition.replace('+', '-plus-')}{fraction_tag(fraction)}_f{fold}_s{seed}"


def study_digest(cfg: Config) -> str:
    return cfg.section_digest("data", "cv", "diffusion", "sampling", "study", "quality")


def dropped_ids(layout: Layout) -> set[str]:
    """Synthetic ids the privacy gate removed (``quality.drop_memorised``)."""
    path = layout.quality / "dropped.json"
    if not path.is_file():
        return set()
    # Written by quality.stage as {"ids": {"<fold>": [synthetic ids]}, ...}: one format to read.
    return {i for per_fold in read_json(path)["ids"].values() for i in per_fold}


def trial_data(cfg: Config, layout: Layout, trial: dict, dropped: set[str]):
    """``(train, test, n_real, n_synthetic)`` of one trial, following ``design``."""
    from raysynth.data.prepare import load_prepared
    from raysynth.diffusion.sample import read_synthetic
    from raysynth.study.design import first_per_class, synthetic_counts, training_set

    condition = Condition(trial["arm"], trial["ratio"])
    fold, fraction = int(trial["fold"]), float(trial["fraction"])
    records, fingerprint, splits = load_prepared(layout)
    split = next(s for s in splits if s["fold"] == fold)
    subset = next(f for f in read_json(layout.subsets)["folds"] if f["fold"] == fold)["subsets"][fraction_key(fraction)]
    real, test = records.subset_ids(subset), records.subset_ids(split["test"])
    synthetic = None
    if condition.uses_synthetic:
        pool = read_synthetic(layout, fold, fraction=fraction)
        real_counts = {c: int((real.labels == c).sum()) for c in range(int(fingerprint["num_classes"]))}
        wanted = synthetic_counts(real_counts, condition.ratio, cfg.sampling.class_balance)
        if pool is None:
            raise StageError(f"study: fold {fold}{fraction_tag(fraction)} has no synthetic samples; run `raysynth sample`")
        synthetic = first_per_class(pool, wanted)
        # Ids the privacy gate dropped leave after the selection, so ratio r stays a prefix.
        if synthetic is not None and dropped:
            keep = [i for i, sid in enumerate(synthetic.ids) if sid not in dropped]
            synthetic = synthetic.select(keep) if keep else None
    train = training_set(condition, real, synthetic)
    return train, test, (len(real) if condition.uses_real else 0), (0 if synthetic is None else len(synthetic))


def run_trial(config: dict) -> None:
    """One Tune trial: train the task CNN of (condition, fraction, fold, seed) and report its test metrics."""
    import torch

    from raysynth.data.prepare import load_prepared
    from raysynth.study.design import augment_for
    from raysynth.study.models import fit_and_evaluate

    cfg = from_dict(config["cfg"])
    st = cfg.study
    set_threads(st.cpus_per_trial)
    layout = Layout.at(config["root"])
    trial = config["trial"]
    seed = int(trial["seed"])
    _, fingerprint, _ = load_prepared(layout)
    train, test, n_real, n_synthetic = trial_data(cfg, layout, trial, set(config["dropped"]))
    segmentation = cfg.data.task == "segmentation"
    t0 = time.time()
    result = fit_and_evaluate(
        cfg.data.task, train, test,
        num_classes=int(fingerprint["num_classes"]),
        num_mask_classes=int(fingerprint.get("num_mask_classes") or 0) or None,
        epochs=st.epochs, batch_size=st.batch_size, learning_rate=st.lr_for(cfg.data.task), width=st.width, seed=seed,
        device="cuda" if torch.cuda.is_available() and st.gpus_per_trial > 0 else "cpu",
        augment=augment_for(Condition(trial["arm"], trial["ratio"]), cfg.data.dims, seed, segmentation),
        class_names=fingerprint["class_names"], mask_class_names=fingerprint.get("mask_names"),
        save_to=layout.study_model(trial_key(**trial)),
    )
    scalars = {k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    payload = {
        **trial, "condition": Condition(trial["arm"], trial["ratio"]).name,
        "n_real": n_real, "n_synthetic": n_synthetic, "n_test": len(test), "seconds": time.time() - t0,
        "metrics": result["metrics"], "test_ids": test.ids, "y_true": result.get("y_true"),
        "y_prob": result.get("y_prob"), "per_sample": result.get("per_sample_dice"),
        "model": str(layout.study_model(trial_key(**trial)).relative_to(layout.root)),
    }
    tune.report({**scalars, "payload": json.dumps(payload)})


def study_grid(cfg: Config, splits: list[dict]) -> list[dict]:
    """Every trial, ordered so that whole (fraction, fold, seed) cells finish together."""
    return [{"arm": c.arm, "ratio": c.ratio, "fraction": float(p), "fold": int(s["fold"]), "seed": int(seed)}
            for p in sorted(cfg.study.real_fractions, reverse=True) for s in splits for seed in cfg.study.seeds
            for c in conditions(cfg)]


def run_study(cfg: Config, layout: Layout, force: bool = False) -> Path:
    """Run the missing trials of the grid and gather ``results.parquet``. Returns its path."""
    from raysynth.data.prepare import load_prepared
    from raysynth.study.design import scarcity_subsets

    records, fingerprint, splits = load_prepared(layout)
    st = cfg.study
    trials_dir = layout.study / "trials"
    if force:
        import shutil

        shutil.rmtree(layout.study, ignore_errors=True)
        shutil.rmtree(layout.ray_storage / "study", ignore_errors=True)
    digest = study_digest(cfg)
    scarcity_subsets(cfg, layout, splits, dict(zip(records.ids, records.labels.tolist())),
                     dict(zip(records.ids, records.subjects)))
    grid = study_grid(cfg, splits)
    missing = sorted({f"{g['fold']}{fraction_tag(g['fraction'])}" for g in grid if Condition(g["arm"], g["ratio"]).uses_synthetic
                      and not (layout.synthetic(g["fold"], g["fraction"]) / "manifest.json").is_file()})
    if missing:
        raise StageError(f"study: synthetic arms need synthetic data for folds {missing}; run `raysynth sample` first")
    done = {p.stem for p in trials_dir.glob("*.json") if read_json(p).get("digest") == digest} if trials_dir.is_dir() else set()
    pending = [g for g in grid if trial_key(**g) not in done]
    log.info("study: %d trials in the grid (%d conditions x %d real fractions x %d folds x %d seeds), %d to run",
             len(grid), len(conditions(cfg)), len(st.real_fractions), len(splits), len(st.seeds), len(pending))
    if pending:
        ensure_ray(cfg)
        dropped = sorted(dropped_ids(layout))
        trainable = tune.with_resources(run_trial, {"cpu": st.cpus_per_trial, "gpu": st.gpus_per_trial})
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
                callbacks=[TrialWriter(trials_dir, digest, len(pending))], verbose=0,
            ),
        )
        results = tuner.fit()
        errors = [r.error for r in results if r.error is not None]
        if errors:
            raise StageError(f"study: {len(errors)} trial(s) failed after {st.max_failures} retries; "
                             f"{len(results) - len(errors)} finished and are kept; first error: {errors[0]}")
    return gather_results(cfg, layout, fingerprint)


class TrialWriter(tune.Callback):
    """Driver-side Tune callback: persist each finished trial at once, and log progress."""

    def __init__(self, folder: Path, digest: str, total: int) -> None:
        self.folder, self.digest, self.total, self.done, self.failed = folder, digest, total, 0, 0
        self.start = time.time()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        payload = json.loads(trial.last_result["payload"])
        payload["digest"] = self.digest
        write_json(self.folder / f"{trial_key(**{k: payload[k] for k in TRIAL_FIELDS})}.json", payload)
        self.done += 1
        m = payload["metrics"]
        headline = ", ".join(f"{k} {m[k]:.3f}" for k in HEADLINE_METRICS if isinstance(m.get(k), (int, float)))
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        log.info("study: %d/%d trials done (%.0fs, ~%.0fs left): %s, real %.0f%%, fold %d, seed %d: %s",
                 self.done, self.total, elapsed, eta, payload["condition"], 100 * payload["fraction"],
                 payload["fold"], payload["seed"], headline)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        log.warning("study: trial %s failed for good (after retries); %d failed so far", trial, self.failed)


TRIAL_FIELDS = ("arm", "ratio", "fraction", "fold", "seed")


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
    write_table(pa.Table.from_pylist(rows), layout.study / "results.parquet")
    if preds:
        write_table(pa.Table.from_pylist(preds), layout.study / "predictions.parquet")
    write_json(layout.study / "study.json", {
        "digest": digest, "num_trials": len(rows), "arms": cfg.study.arms,
        "conditions": [c.name for c in conditions(cfg)], "real_fractions": cfg.study.real_fractions,
        "seeds": cfg.study.seeds, "class_names": fingerprint["class_names"]})
    log.info("study: %d trial results in %s", len(rows), layout.study / "results.parquet")
    return layout.study / "results.parquet"


def finished_trials(cfg: Config, layout: Layout) -> list[dict]:
    """The trial files of this config's study (its digest), each with ``real_fraction`` and the
    split's CV ``repeat`` added: the rows both ``results.parquet`` and the robustness stage key on."""
    from raysynth.data.prepare import load_prepared

    folder = layout.study / "trials"
    digest = study_digest(cfg)
    trials = [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    trials = [t for t in trials if t.get("digest") == digest]
    if not trials:
        return []
    repeat_of = {int(s["fold"]): int(s.get("repeat", 0)) for s in load_prepared(layout)[2]}
    return [{**t, "real_fraction": float(t["fraction"]), "repeat": repeat_of.get(int(t["fold"]), 0)} for t in trials]


def write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet table atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def load_results(layout: Layout) -> list[dict[str, Any]]:
    path = layout.study / "results.parquet"
    if not path.is_file():
        raise StageError(f"no study results at {path}; run `raysynth study` first")
    return pq.read_table(path).to_pylist()


def load_predictions(layout: Layout) -> Optional[list[dict[str, Any]]]:
    path = layout.study / "predictions.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else None
