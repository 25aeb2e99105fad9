"""Stage ``study``: the Ray Tune grid of downstream CNNs, arm x fold x seed.

Every arm of a fold reads the same ``splits.json`` and the same seeds, so the baseline and the
augmented model of a (fold, seed) differ only in their training data: the pairing the
statistics rely on. Test folds are real data only.

Each finished trial is written at once to ``OUT/study/trials/<arm>_f<fold>_s<seed>.json`` by a
driver-side Tune callback, so a study that dies half-way resumes with only the missing trials.
The artifact is ``OUT/study/results.parquet`` (one row per arm x fold x seed) and
``predictions.parquet`` (per test record), gathered from those files.
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
from raysynth.layout import Layout, read_json, write_json
from raysynth.runtime import ensure_ray, set_threads

log = logging.getLogger(__name__)

SYNTHETIC_ARMS = {"augmented"}
HEADLINE_METRICS = ("balanced_accuracy", "auc", "mean_dice")


def trial_key(arm: str, fold: int, seed: int) -> str:
    return f"{arm}_f{fold}_s{seed}"


def study_digest(cfg: Config) -> str:
    return cfg.section_digest("data", "cv", "diffusion", "sampling", "study", "quality")


def dropped_ids(layout: Layout) -> set[str]:
    """Synthetic ids the privacy gate removed (``quality.drop_memorised``)."""
    path = layout.quality / "dropped.json"
    if not path.is_file():
        return set()
    dropped = read_json(path)
    ids = dropped.get("ids") if isinstance(dropped, dict) and "ids" in dropped else dropped
    if isinstance(ids, dict):
        return {i for per_fold in ids.values() for i in per_fold}
    return set(ids or [])


def run_trial(config: dict) -> None:
    """One Tune trial: train the task CNN of (arm, fold, seed) and report its test metrics."""
    import torch

    from raysynth.data.prepare import load_prepared
    from raysynth.data.schema import ImageSet
    from raysynth.diffusion.sample import read_synthetic
    from raysynth.study.models import fit_and_evaluate

    cfg = from_dict(config["cfg"])
    st = cfg.study
    set_threads(st.cpus_per_trial)
    layout = Layout.at(config["root"])
    arm, fold, seed = config["trial"]["arm"], int(config["trial"]["fold"]), int(config["trial"]["seed"])
    records, fingerprint, splits = load_prepared(layout)
    split = next(s for s in splits if s["fold"] == fold)
    train, test = records.subset_ids(split["train"]), records.subset_ids(split["test"])
    n_real = len(train)
    n_synthetic = 0
    if arm in SYNTHETIC_ARMS:
        synthetic = read_synthetic(layout, fold, exclude=set(config["dropped"]))
        if synthetic is not None:
            n_synthetic = len(synthetic)
            synthetic = ImageSet(synthetic.ids, synthetic.subjects, synthetic.labels, synthetic.images, synthetic.masks,
                                 spacing=train.spacing)
            train = ImageSet.concat([train, synthetic])
    t0 = time.time()
    result = fit_and_evaluate(
        cfg.data.task, train, test,
        num_classes=int(fingerprint["num_classes"]),
        num_mask_classes=int(fingerprint.get("num_mask_classes") or 0) or None,
        epochs=st.epochs, batch_size=st.batch_size, learning_rate=st.lr_for(cfg.data.task), width=st.width, seed=seed,
        device="cuda" if torch.cuda.is_available() and st.gpus_per_trial > 0 else "cpu",
        class_names=fingerprint["class_names"],
    )
    scalars = {k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    payload = {
        "arm": arm, "fold": fold, "seed": seed, "n_real": n_real, "n_synthetic": n_synthetic,
        "n_test": len(test), "seconds": time.time() - t0, "metrics": result["metrics"],
        "test_ids": test.ids, "y_true": result.get("y_true"), "y_prob": result.get("y_prob"),
        "per_sample": result.get("per_sample_dice"),
    }
    tune.report({**scalars, "payload": json.dumps(payload)})


def run_study(cfg: Config, layout: Layout, force: bool = False) -> Path:
    """Run the missing trials of the grid and gather ``results.parquet``. Returns its path."""
    from raysynth.data.prepare import load_prepared

    _, fingerprint, splits = load_prepared(layout)
    st = cfg.study
    trials_dir = layout.study / "trials"
    if force:
        import shutil

        shutil.rmtree(layout.study, ignore_errors=True)
        shutil.rmtree(layout.ray_storage / "study", ignore_errors=True)
    digest = study_digest(cfg)
    for arm in st.arms:
        if arm in SYNTHETIC_ARMS:
            missing = [s["fold"] for s in splits if not (layout.synthetic(s["fold"]) / "manifest.json").is_file()]
            if missing:
                raise StageError(f"study: arm {arm!r} needs synthetic data for folds {missing}; run `raysynth sample` first")
    grid = [{"arm": a, "fold": s["fold"], "seed": seed} for a in st.arms for s in splits for seed in st.seeds]
    done = {p.stem for p in trials_dir.glob("*.json") if read_json(p).get("digest") == digest} if trials_dir.is_dir() else set()
    pending = [g for g in grid if trial_key(g["arm"], g["fold"], g["seed"]) not in done]
    log.info("study: %d trials in the grid (%d arms x %d folds x %d seeds), %d to run",
             len(grid), len(st.arms), len(splits), len(st.seeds), len(pending))
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
            raise StageError(f"study: {len(errors)} trial(s) failed after retries; first error: {errors[0]}")
    return gather_results(cfg, layout, fingerprint)


class TrialWriter(tune.Callback):
    """Driver-side Tune callback: persist each finished trial at once, and log progress."""

    def __init__(self, folder: Path, digest: str, total: int) -> None:
        self.folder, self.digest, self.total, self.done = folder, digest, total, 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        payload = json.loads(trial.last_result["payload"])
        payload["digest"] = self.digest
        write_json(self.folder / f"{trial_key(payload['arm'], payload['fold'], payload['seed'])}.json", payload)
        self.done += 1
        m = payload["metrics"]
        headline = ", ".join(f"{k} {m[k]:.3f}" for k in HEADLINE_METRICS if isinstance(m.get(k), (int, float)))
        log.info("study: %d/%d trials done: %s fold %d seed %d: %s", self.done, self.total,
                 payload["arm"], payload["fold"], payload["seed"], headline)


def gather_results(cfg: Config, layout: Layout, fingerprint: dict) -> Path:
    trials = [read_json(p) for p in sorted((layout.study / "trials").glob("*.json"))]
    digest = study_digest(cfg)
    trials = [t for t in trials if t.get("digest") == digest]
    if not trials:
        raise StageError("study: no finished trials to gather")
    rows, preds = [], []
    for t in trials:
        scalar = {k: float(v) for k, v in t["metrics"].items() if isinstance(v, (int, float))}
        rows.append({"arm": t["arm"], "fold": t["fold"], "seed": t["seed"], "n_real": t["n_real"],
                     "n_synthetic": t["n_synthetic"], "n_test": t["n_test"], "seconds": t["seconds"],
                     **scalar, "metrics_json": json.dumps(t["metrics"])})
        if t.get("y_prob") is not None:
            for rid, y, p in zip(t["test_ids"], t["y_true"], t["y_prob"]):
                preds.append({"arm": t["arm"], "fold": t["fold"], "seed": t["seed"], "id": rid, "y_true": int(y),
                              "y_prob": [float(v) for v in p]})
    layout.study.mkdir(parents=True, exist_ok=True)
    _write_table(pa.Table.from_pylist(rows), layout.study / "results.parquet")
    if preds:
        _write_table(pa.Table.from_pylist(preds), layout.study / "predictions.parquet")
    write_json(layout.study / "study.json", {"digest": digest, "num_trials": len(rows), "arms": cfg.study.arms,
                                             "seeds": cfg.study.seeds, "class_names": fingerprint["class_names"]})
    log.info("study: %d trial results in %s", len(rows), layout.study / "results.parquet")
    return layout.study / "results.parquet"


def _write_table(table: pa.Table, path: Path) -> None:
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
