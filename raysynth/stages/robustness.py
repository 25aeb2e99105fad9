"""Stage ``robustness``: every trained study model on corrupted test parts and an external test set.

Nothing is retrained. The study stage keeps each trial's network (``OUT/study/models/<key>.pt``);
this stage scores those networks on

* each split's real test part, corrupted with every ``robustness.corruptions`` at every
  ``robustness.severities`` (``downstream.augment.build_corruption``). The draws are seeded by (split,
  corruption, severity) alone, so every arm and seed of a split sees the same corrupted images
  and the comparisons stay paired;
* the external test set (``data.external``), which no generator and no model selection has seen.

One Ray task per split corrupts its test part once and scores all of that split's networks
(every arm, ratio, real fraction and seed). Each finished split is written at once to
``OUT/robustness/splits/<fold>.json``, so an interrupted stage reruns only the missing splits.
Artifacts in ``OUT/robustness/``: ``corrupted.parquet`` (one row per trial x corruption x
severity), ``external.parquet`` (one row per trial), ``external_predictions.parquet``
(classification: one row per external record and trial) and ``robustness.json`` (what was
evaluated, with an example test image under every corruption and severity).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raysynth import artifacts
from raysynth.artifacts import (
    ROBUSTNESS_JSON,
    Layout,
    finished_trials,
    read_json,
    read_prepared,
)
from raysynth.config import Config
from raysynth.console import Progress, one_line
from raysynth.data.external import BUILTIN, external_source, load_external
from raysynth.data.sources import source_signature
from raysynth.downstream.robust_eval import corrupt_test_part, evaluate_split
from raysynth.errors import StageError
from raysynth.io import write_json, write_table
from raysynth.render.figures import encode_images, image_view
from raysynth.runtime import ensure_ray

log = logging.getLogger(__name__)

def robustness_digest(cfg: Config) -> str:
    """The study's digest, the robustness section and the external data's file signature."""
    source = external_source(cfg)
    return artifacts.robustness_digest(cfg, source, source_signature(source) if source not in (None, BUILTIN) else None)


def study_trials(cfg: Config, layout: Layout) -> list[dict]:
    """The study's finished trials (``artifacts.finished_trials``), each with a saved network."""
    trials = finished_trials(cfg, layout)
    if not trials:
        raise StageError("robustness: no finished study trials for this config; run `raysynth study` first")
    no_model = [t for t in trials if not t.get("model") or not (layout.root / t["model"]).is_file()]
    if no_model:
        raise StageError(f"robustness: {len(no_model)} study trial(s) have no saved network (e.g. fold "
                         f"{no_model[0]['fold']}, {no_model[0]['condition']}), written by an older raysynth or "
                         "deleted; rerun `raysynth study --force`")
    return trials


def run_robustness(cfg: Config, layout: Layout, force: bool = False) -> Path:
    """Evaluate the missing splits and gather the tables; returns ``OUT/robustness/robustness.json``."""
    _, fingerprint, _ = read_prepared(layout, cfg)
    digest = robustness_digest(cfg)
    folder = layout.robustness / "splits"
    if force:
        shutil.rmtree(layout.robustness, ignore_errors=True)
    trials = study_trials(cfg, layout)
    by_fold: dict[int, list[dict]] = {}
    for t in trials:
        by_fold.setdefault(int(t["fold"]), []).append(t)
    done = {int(p.stem) for p in folder.glob("*.json") if read_json(p).get("digest") == digest} \
        if folder.is_dir() else set()
    pending = sorted(set(by_fold) - done)
    rb = cfg.robustness
    log.info("robustness: %d trained networks in %d splits; %d corruptions x %d severities%s; %d split(s) to run",
             len(trials), len(by_fold), len(rb.corruptions), len(rb.severities),
             f", external test set {external_source(cfg)}" if external_source(cfg) else ", no external test set",
             len(pending))
    external = load_external(cfg, fingerprint) if pending else None
    if pending:
        ensure_ray(cfg)
        task = ray.remote(evaluate_split).options(num_cpus=cfg.study.cpus_per_trial, num_gpus=cfg.study.gpus_per_trial,
                                                  max_retries=cfg.study.max_failures)
        ext_ref = ray.put(external)
        refs = {task.remote(cfg.to_dict(), str(layout.root), fold, by_fold[fold], ext_ref): fold for fold in pending}
        start, finished = time.time(), 0
        with Progress("robustness", sum(len(by_fold[f]) for f in pending), "networks") as bar:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                fold = refs.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as exc:  # the task already had its retries
                    raise StageError(f"robustness: split {fold} failed: {one_line(exc)}") from exc
                write_json(folder / f"{fold}.json", {**result, "digest": digest})
                finished += 1
                elapsed = time.time() - start
                bar.note(f"{finished}/{len(pending)} splits")
                bar.update(len(by_fold[fold]))
                log.debug("robustness: split %d done (%d/%d, %.0fs, ~%.0fs left, %d networks)", fold, finished,
                          len(pending), elapsed, elapsed / finished * (len(pending) - finished), len(by_fold[fold]))
    return gather(cfg, layout, fingerprint, digest, external)


def gather(cfg: Config, layout: Layout, fingerprint: dict, digest: str, external: Any) -> Path:
    """Concatenate the per-split files into the stage's Parquet tables and robustness.json."""
    parts = [read_json(p) for p in sorted((layout.robustness / "splits").glob("*.json"))]
    parts = [p for p in parts if p.get("digest") == digest]
    tables = {"corrupted": [r for p in parts for r in p["corrupted"]],  # the names of artifacts.ROBUSTNESS_TABLES
              "external": [r for p in parts for r in p["external"]],
              "external_predictions": [r for p in parts for r in p["predictions"]]}
    for name, rows in tables.items():
        path = layout.robustness / f"{name}.parquet"
        if rows:
            write_table(pa.Table.from_pylist(rows), path)
        else:
            path.unlink(missing_ok=True)
    records, _, splits = read_prepared(layout, cfg)
    summary = {
        "digest": digest,
        "corruptions": list(cfg.robustness.corruptions),
        "severities": sorted(cfg.robustness.severities),
        "seed": cfg.robustness.seed,
        "external_source": external_source(cfg),
        "n_external": None if not tables["external"] else int(tables["external"][0]["n_external"]),
        "n_trials": len({(r["condition"], r["real_fraction"], r["fold"], r["seed"]) for r in tables["corrupted"]}),
        "splits": sorted(int(p["fold"]) for p in parts),
        "seconds": sum(float(p.get("seconds", 0.0)) for p in parts),
        "examples": _examples(cfg, records, splits),
        "external_examples": None if external is None else _external_examples(external, fingerprint["class_names"]),
    }
    path = layout.robustness / ROBUSTNESS_JSON
    write_json(path, summary)
    log.info("robustness: %d corrupted and %d external evaluations in %s", len(tables["corrupted"]),
             len(tables["external"]), layout.robustness)
    return path


def _examples(cfg: Config, records, splits: list[dict]) -> dict:
    """The first test image of the first split, clean and under every corruption and severity
    (middle slice for volumes), as the exact images the models saw; base64 uint8."""
    fold = int(splits[0]["fold"])
    image = records.subset_ids(splits[0]["test"][:1]).images
    corrupted = corrupt_test_part(cfg, fold, image)
    rows = {c: encode_images(np.stack([image_view(corrupted[(c, s)][0]) for s in sorted(cfg.robustness.severities)]))
            for c in cfg.robustness.corruptions}
    return {"fold": fold, "clean": encode_images(image_view(image[0])), "rows": rows}


def _external_examples(external, class_names: list[str], per_class: int = 4) -> dict:
    out = {}
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(external.labels == c)[:per_class]
        if len(idx):
            out[name] = encode_images(np.stack([image_view(external.images[i]) for i in idx]))
    return out


def load_table(layout: Layout, name: str) -> Optional[list[dict]]:
    """Rows of ``OUT/robustness/<name>.parquet`` or None when the stage has not written it."""
    path = layout.robustness / f"{name}.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else None
