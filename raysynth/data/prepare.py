"""The prepare stage: real inputs -> ``OUT/prepared/{data.parquet, fingerprint.json, splits.json}``.

Idempotent (nnU-Net style): when all three files exist, the fingerprint's config digest matches
the ``data`` and ``cv`` sections and the source folder is unchanged, the stage does nothing.
Everything is loaded, checked, preprocessed and split before the first byte is written, each file
is written to a temporary name and renamed, and ``fingerprint.json`` goes last: it is the mark of
a complete stage, so a crash in between leaves a stage that reruns rather than one that lies.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

import raysynth
from raysynth.config import Config
from raysynth.data.preprocess import preprocess
from raysynth.data.schema import ImageSet, read_parquet, write_parquet
from raysynth.data.sources import RawSet, load_source
from raysynth.data.splits import make_splits
from raysynth.errors import StageError
from raysynth.layout import Layout, read_json, write_json

logger = logging.getLogger(__name__)

_PERCENTILES = (0.5, 1.0, 50.0, 99.0, 99.5)


def prepare(cfg: Config, layout: Layout, force: bool = False) -> dict:
    """Run the prepare stage and return the fingerprint (see the module docstring)."""
    digest = cfg.section_digest("data", "cv")
    signature = source_signature(cfg.data.source)
    if not force:
        current = _up_to_date(layout, digest, signature)
        if current is not None:
            logger.info("prepare: up to date (%s)", layout.prepared)
            return current
    start = time.perf_counter()
    logger.info("prepare: loading %s", cfg.data.source or "the embedded cohort")
    raw = load_source(cfg.data)
    logger.info("prepare: %d raw records (%s); preprocessing", len(raw.scans), raw.kind)
    records = preprocess(raw, cfg.data)
    folds = make_splits(records.labels, records.subjects, cfg.cv.folds, cfg.cv.repeats, cfg.cv.seed,
                        ids=records.ids, class_names=raw.class_names)
    fingerprint = _fingerprint(cfg, raw, records, digest, signature)
    splits = {"folds": folds, "seed": cfg.cv.seed, "n_folds": cfg.cv.folds, "repeats": cfg.cv.repeats,
              "stratified_by": "label", "grouped_by": "subject"}

    layout.fingerprint.unlink(missing_ok=True)  # from here until the end, the stage reads as not done
    write_parquet(records, layout.data_parquet)
    write_json(layout.splits, splits)
    write_json(layout.fingerprint, fingerprint)
    logger.info("prepare: wrote %d records, %d folds to %s in %.1f s", len(records), len(folds),
                layout.prepared, time.perf_counter() - start)
    return fingerprint


def load_prepared(layout: Layout, cfg: Optional[Config] = None) -> tuple[ImageSet, dict, list[dict]]:
    """The prepared records, fingerprint and folds. With ``cfg``, also checks they were made from
    its ``data`` and ``cv`` sections. Raises :class:`StageError` when prepare has not run."""
    missing = [p for p in (layout.fingerprint, layout.data_parquet, layout.splits) if not p.is_file()]
    if missing:
        raise StageError(f"prepare has not run: {missing[0]} is missing; run the prepare stage first")
    fingerprint = read_json(layout.fingerprint)
    if cfg is not None and fingerprint.get("config_digest") != cfg.section_digest("data", "cv"):
        raise StageError(f"{layout.prepared} was prepared with another data/cv config "
                         f"(digest {fingerprint.get('config_digest')}); rerun prepare")
    return read_parquet(layout.data_parquet), fingerprint, read_json(layout.splits)["folds"]


def source_signature(source: Optional[str]) -> Optional[str]:
    """A hash of every file's path, size and mtime under ``source`` (None for the embedded cohort):
    the config digest alone cannot see files added to or changed in the folder."""
    if source is None:
        return None
    root = Path(source).expanduser()
    if not root.is_dir():
        return None  # load_source reports the missing folder
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        # fsencode: a file name need not be valid UTF-8 (surrogate escapes would not encode).
        h.update(os.fsencode(path.relative_to(root)) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _up_to_date(layout: Layout, digest: str, signature: Optional[str]) -> Optional[dict]:
    if not all(p.is_file() for p in (layout.fingerprint, layout.data_parquet, layout.splits)):
        return None
    try:
        fingerprint = read_json(layout.fingerprint)
    except (OSError, ValueError):
        return None
    if fingerprint.get("config_digest") != digest:
        logger.info("prepare: config changed since the last run; preparing again")
        return None
    if fingerprint.get("source_signature") != signature:
        logger.info("prepare: files in %s changed since the last run; preparing again", layout.prepared)
        return None
    return fingerprint


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
        "shape": list(records.spatial_shape),
        "spacing": [float(s) for s in records.spacing],
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
                                  "cohort_seed": d.cohort_seed, "native_shape": list(first.image.shape),
                                  "native_spacing": list(first.spacing)}
    return fingerprint
