"""Stage ``prepare``: real inputs -> ``OUT/prepared/{data.parquet, fingerprint.json, splits.json, subsets.json}``.

Idempotent (nnU-Net style): when all three files exist, the fingerprint's config digest matches
the ``data`` and ``cv`` sections and the source folder is unchanged, the stage does nothing.
Everything is loaded, checked, preprocessed and split before the first byte is written, each file
is written to a temporary name and renamed, and ``fingerprint.json`` goes last: it is the mark of
a complete stage, so a crash in between leaves a stage that reruns rather than one that lies.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Optional

import numpy as np

import raysynth
from raysynth.artifacts import Layout, fraction_key, prepared_digest, prepared_outdated, read_json
from raysynth.config import Config
from raysynth.data.preprocess import preprocess
from raysynth.data.raw import RawSet, channel_names
from raysynth.data.schema import ImageSet, read_parquet, write_parquet
from raysynth.data.sources import load_source, source_signature
from raysynth.data.splits import make_splits
from raysynth.data.subjects import group_duplicates
from raysynth.design import scarcity_subsets
from raysynth.errors import InputError
from raysynth.io import write_json

logger = logging.getLogger(__name__)

_PERCENTILES = (0.5, 1.0, 50.0, 99.0, 99.5)


def prepare(cfg: Config, layout: Layout, force: bool = False) -> dict:
    """Run the prepare stage and return the fingerprint (see the module docstring)."""
    digest = prepared_digest(cfg)
    signature = source_signature(cfg.data.source)
    if not force:
        current = _up_to_date(layout, cfg, signature)
        if current is not None:
            _write_subsets(cfg, layout, current_only=True)
            logger.info("prepare: up to date (%s)", layout.prepared)
            return current
    start = time.perf_counter()
    logger.info("prepare: loading %s", cfg.data.source or "the embedded cohort")
    if cfg.data.source is None and cfg.data.channels != "grey":
        raise InputError(f"data.channels={cfg.data.channels!r}: the embedded cohort has one grey channel; "
                         f"set data.source to a folder of multi-channel scans")
    raw = load_source(cfg.data)
    duplicates: dict = {"policy": cfg.data.duplicates, "not_run": "the embedded cohort: distinct scans by construction"}
    if not raw.kind.startswith("phantom"):
        t0 = time.perf_counter()
        logger.info("prepare: looking for exact and near-duplicates among %d images", len(raw.scans))
        raw, duplicates = group_duplicates(raw, cfg.data.duplicates, cfg.data.duplicate_threshold,
                                           labels_from_masks=cfg.data.task == "segmentation")
        logger.info("prepare: %d duplicate groups (%d images) at threshold %g in %.1f s (data.duplicates=%s)",
                    duplicates["num_groups"], duplicates["num_grouped_images"], duplicates["threshold"],
                    time.perf_counter() - t0, cfg.data.duplicates)
    logger.info("prepare: %d raw records (%s); preprocessing", len(raw.scans), raw.kind)
    records = preprocess(raw, cfg.data)
    folds = make_splits(records.labels, records.subjects, cfg.cv.folds, cfg.cv.repeats, cfg.cv.seed,
                        ids=records.ids, class_names=raw.class_names)
    fingerprint = _fingerprint(cfg, raw, records, digest, signature)
    fingerprint["duplicates"] = duplicates
    splits = {"folds": folds, "seed": cfg.cv.seed, "n_folds": cfg.cv.folds, "repeats": cfg.cv.repeats,
              "stratified_by": "label", "grouped_by": "subject"}

    layout.fingerprint.unlink(missing_ok=True)  # from here until the end, the stage reads as not done
    write_parquet(records, layout.data_parquet)
    write_json(layout.splits, splits)
    _write_subsets(cfg, layout, records=records, folds=folds)
    write_json(layout.fingerprint, fingerprint)
    logger.info("prepare: wrote %d records, %d folds to %s in %.1f s", len(records), len(folds),
                layout.prepared, time.perf_counter() - start)
    return fingerprint


def _write_subsets(cfg: Config, layout: Layout, *, records: Optional[ImageSet] = None,
                   folds: Optional[list[dict]] = None, current_only: bool = False) -> None:
    """``subsets.json``: nested real subsets of every fold's training part for 1.0 and every
    ``study.real_fractions``. Fractions already on file for the same splits are kept (a subset
    never depends on the other fractions), so raising the list adds subsets without moving any.
    ``current_only``: the rest of prepare is up to date; only add missing fractions."""
    if records is None:
        records = read_parquet(layout.data_parquet)
    if folds is None:
        folds = read_json(layout.splits)["folds"]
    wanted = sorted(set(cfg.study.real_fractions) | {1.0})
    old = read_json(layout.subsets) if layout.subsets.is_file() else None
    same_splits = old is not None and old.get("seed") == cfg.cv.seed and \
        [f["test"] for f in old.get("folds", [])] == [f["test"] for f in folds]
    if current_only and same_splits and all(fraction_key(p) in f["subsets"] for f in old["folds"] for p in wanted):
        return
    record = scarcity_subsets(cfg, folds, dict(zip(records.ids, records.labels.tolist())),
                              dict(zip(records.ids, records.subjects)), wanted)
    if same_splits:
        for new, prev in zip(record["folds"], old["folds"]):
            new["subsets"] = {**prev["subsets"], **new["subsets"]}
    write_json(layout.subsets, record)


def _up_to_date(layout: Layout, cfg: Config, signature: Optional[str]) -> Optional[dict]:
    why = prepared_outdated(layout, cfg, signature)
    if why == "config":
        logger.info("prepare: config changed since the last run; preparing again")
    elif why == "source":
        logger.info("prepare: files in %s changed since the last run; preparing again", layout.prepared)
    return read_json(layout.fingerprint) if why is None else None


def _stats(arrays, low: float, high: float) -> dict:
    """Mean, std and percentiles over a deterministic subsample (<= 4096 values per array)."""
    values = np.concatenate([a.ravel()[:: max(1, a.size // 4096)] for a in arrays]).astype(np.float64)
    levels = sorted(set(_PERCENTILES + (low, high)))
    pct = np.percentile(values, levels)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "percentiles": {f"{p:g}": float(v) for p, v in zip(levels, pct)}}


def _fingerprint(cfg: Config, raw: RawSet, records: ImageSet, digest: str, signature: Optional[str]) -> dict:
    d = cfg.data
    counts = np.bincount(records.labels, minlength=len(raw.class_names))
    mask_names = raw.mask_names if records.masks is not None else None
    fingerprint = {
        "dims": d.dims,
        "task": d.task,
        "source_kind": raw.kind,
        "source": d.source,
        "source_signature": signature,
        "class_names": list(raw.class_names),
        "num_classes": len(raw.class_names),
        "mask_names": mask_names,
        "num_mask_classes": len(mask_names) if mask_names else 0,
        "counts": {name: int(c) for name, c in zip(raw.class_names, counts)},
        "num_records": len(records),
        "num_subjects": len(set(records.subjects)),
        "shape": list(records.record_shape),  # [C, *spatial]
        "channels": channel_names(d.channels, records.num_channels),
        # A picture has no physical spacing: it is recorded as unknown, in pixels, never as millimetres.
        "spacing": None if raw.kind == "images" else [float(s) for s in records.spacing],
        "spacing_unit": "pixel" if raw.kind == "images" else "mm",
        "intensity": {
            "raw": _stats((s.image for s in raw.scans), d.low_percentile, d.high_percentile),
            "normalised": _stats(records.images, d.low_percentile, d.high_percentile),
        },
        "skipped": list(raw.skipped),
        # Only here do record ids meet file names; later stages never copy this list.
        "sources": None if raw.kind.startswith("phantom") else sorted(
            {(s.subject, s.source) for s in raw.scans}),
        "config_digest": digest,
        "raysynth_version": raysynth.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if fingerprint["sources"] is not None:
        fingerprint["sources"] = [{"subject": sid, "path": path} for sid, path in fingerprint["sources"]]
    if raw.kind.startswith("phantom"):
        first = raw.scans[0]
        fingerprint["phantom"] = {"num_scans": d.num_scans, "lesion_fraction": d.lesion_fraction,
                                  "cohort_seed": d.cohort_seed, "native_shape": list(first.image.shape[1:]),
                                  "native_spacing": list(first.spacing)}
    return fingerprint
