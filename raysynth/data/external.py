"""The external test set: data from elsewhere, preprocessed like the main data, for generalisation only.

It is read by the robustness stage alone. No generator trains on it, no model is selected on
it and no statistic of it feeds back into preprocessing (every scan is normalised on its own
percentiles), so a score on it says how a model trained on the main data travels to another
site or scanner.

Two sources: ``robustness.external_test`` (a path in any supported form: class folders, or a
NIfTI folder with ``labels.csv``), or, for the embedded cohort, the same anatomy seen by
another simulated scanner (:data:`raysynth.data.phantom.SCANNERS` ``[True]``: other contrast,
noise, resolution and bias). External class names must match the training class names, or be
mapped to them with ``robustness.label_map``; anything else is an error that names the classes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

from raysynth.config import Config
from raysynth.data.phantom import cohort_from_config
from raysynth.data.preprocess import preprocess
from raysynth.data.raw import RawSet
from raysynth.data.schema import ImageSet
from raysynth.data.sources import load_source
from raysynth.errors import InputError

log = logging.getLogger(__name__)

BUILTIN = "builtin: embedded cohort, shifted scanner"


def external_source(cfg: Config) -> Optional[str]:
    """What the external test set is: a path, :data:`BUILTIN`, or None (there is none)."""
    rb = cfg.robustness
    if rb.external_test is not None:
        return rb.external_test
    if rb.builtin_external and cfg.data.source is None:
        return BUILTIN
    return None


def external_test_set(cfg: Config, num_scans: Optional[int] = None) -> ImageSet:
    """The built-in external test set: the embedded cohort seen by another simulated scanner,
    preprocessed like the main cohort. Only meaningful when the main data is the embedded cohort."""
    if cfg.data.source is not None:
        raise InputError("external_test_set: the built-in external set matches only the embedded "
                         f"cohort, but data.source is {cfg.data.source!r}")
    return preprocess(cohort_from_config(cfg.data, shifted=True, num_scans=num_scans), cfg.data)


def load_external(cfg: Config, fingerprint: dict) -> Optional[ImageSet]:
    """The external test set with labels (and masks) in the training data's class indices, or
    None when :func:`external_source` is None. Raises :class:`InputError` on a class, mask or
    shape that does not fit the prepared data described by ``fingerprint``."""
    source = external_source(cfg)
    if source is None:
        return None
    if source == BUILTIN:
        records = external_test_set(cfg, num_scans=cfg.robustness.external_scans)
        raw_names, mask_names = list(fingerprint["class_names"]), fingerprint.get("mask_names")
    else:
        raw = _load_raw(cfg, source)
        records = preprocess(raw, cfg.data)
        raw_names, mask_names = raw.class_names, raw.mask_names
    records = relabel(records, raw_names, list(fingerprint["class_names"]), cfg.robustness.label_map, source)
    if cfg.data.task == "segmentation":
        _check_masks(records, mask_names, fingerprint, source)
    if list(records.record_shape) != list(fingerprint["shape"]):
        raise InputError(f"external test set {source}: shape {list(records.record_shape)} (channels first) differs from the "
                         f"prepared data's {fingerprint['shape']}")
    # Prefixed ids: an external record can never be mistaken for (or joined with) a main record.
    records = dataclasses.replace(records, ids=[f"ext-{i}" for i in records.ids])
    counts = {n: int((records.labels == c).sum()) for c, n in enumerate(fingerprint["class_names"])}
    log.info("robustness: external test set %s: %d records %s", source, len(records), counts)
    return records


def _load_raw(cfg: Config, source: str) -> RawSet:
    data = cfg.data.replace(source=source)  # a validated copy (model_copy would skip validation)
    try:
        return load_source(data)
    except InputError as exc:
        raise InputError(f"external test set: {exc}") from None


def relabel(records: ImageSet, names: list[str], training_names: list[str], label_map: dict[str, str],
            source: str) -> ImageSet:
    """Map ``records.labels`` (indices into ``names``) to indices into ``training_names``, through
    ``label_map`` (external name -> training name) where given, by equal name otherwise."""
    unused = sorted(set(label_map) - set(names))
    if unused:
        raise InputError(f"robustness.label_map: {unused} are not classes of the external test set {source} "
                         f"(its classes: {names})")
    bad_targets = sorted({v for v in label_map.values() if v not in training_names})
    if bad_targets:
        raise InputError(f"robustness.label_map: targets {bad_targets} are not training classes {training_names}")
    mapped = [label_map.get(n, n) for n in names]
    present = sorted({names[i] for i in np.unique(records.labels)})
    unknown = [n for n in present if label_map.get(n, n) not in training_names]
    if unknown:
        raise InputError(f"external test set {source}: classes {unknown} match no training class {training_names}; "
                         "map them with robustness.label_map (external name: training name), e.g. "
                         f"--set 'robustness.label_map={{{unknown[0]}: {training_names[0]}}}'")
    index = np.array([training_names.index(m) if m in training_names else -1 for m in mapped], dtype=np.int64)
    return dataclasses.replace(records, labels=index[records.labels])


def _check_masks(records: ImageSet, mask_names: Optional[list[str]], fingerprint: dict, source: str) -> None:
    if records.masks is None:
        raise InputError(f"external test set {source}: segmentation needs masks, and it has none")
    expected = fingerprint.get("mask_names")
    if mask_names is not None and expected is not None and len(mask_names) != len(expected):
        raise InputError(f"external test set {source}: {len(mask_names)} mask classes {mask_names}, the training "
                         f"data has {len(expected)} {expected}")
    top = int(records.masks.max()) if records.masks.size else 0
    if top >= int(fingerprint.get("num_mask_classes") or 0):
        raise InputError(f"external test set {source}: mask label {top} is not a training mask class "
                         f"(0..{int(fingerprint['num_mask_classes']) - 1})")
