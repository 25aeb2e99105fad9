"""Duplicate groups become subjects: ``data.duplicates`` applied to a loaded :class:`RawSet`.

A duplicate pair split across a training and a test fold inflates every metric and blinds the
privacy gate (a held-out real image whose copy is in the training part scores NCC 1.0, so the
gate's reference quantile becomes 1.0). The folds are grouped by subject, so the cure is to make
every duplicate group part of one subject:

- ``group`` (the default): each group and the subjects its images already belong to (a patient's
  slices, a volume's slices) become one subject.
- ``drop``: keep the first image of each group and drop the others. A group whose images carry
  different labels is dropped whole, with a warning.
- ``keep``: leave them as they are, with a warning (the metrics may then be inflated).

Under ``group`` a group whose images carry different labels (one picture filed under two classes)
is an error that names two of its files: no policy can tell which label is right. ``drop`` drops
such a group whole and ``keep`` keeps it, each with a warning that names two of its files.

For segmentation (``labels_from_masks``) the label is derived from the mask (lesion or not), so a
group may rightly mix them: adjacent slices of one patient, one just past a lesion's edge, can be
near-identical. Such groups are grouped (or thinned) like any other; the masks travel with images.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from raysynth.data.duplicates import DuplicateGroups, find_groups
from raysynth.data.raw import RawSet
from raysynth.errors import InputError

logger = logging.getLogger(__name__)


def group_duplicates(raw: RawSet, policy: str, threshold: float, *,
                     labels_from_masks: bool = False) -> tuple[RawSet, dict[str, Any]]:
    """Find exact and near-duplicate scans and apply ``policy``. Returns the new set and what the
    fingerprint records (method, threshold, groups found, images in them, what was done)."""
    if policy not in ("group", "drop", "keep"):
        raise ValueError(f"policy: {policy!r} is not valid; choose one of ['group', 'drop', 'keep']")
    # RawScan.image is (C, *S): compare the channel mean (C = 1: the image itself).
    found = find_groups([s.image.mean(axis=0) for s in raw.scans], threshold=threshold)
    summary: dict[str, Any] = {
        "policy": policy, "method": found.method, "threshold": found.threshold,
        "num_groups": found.num_groups, "num_grouped_images": found.num_grouped_images,
        "num_exact": found.num_exact, "num_dropped": 0, "num_conflicting_groups": 0,
    }
    mixed = [g for g in found.groups if len({raw.scans[i].label for i in g}) > 1]
    conflicting = [] if labels_from_masks else mixed
    summary["num_conflicting_groups"] = len(conflicting)
    if labels_from_masks:
        summary["num_mixed_lesion_groups"] = len(mixed)
    if conflicting and policy == "group":
        a, b = _two_labels(raw, conflicting[0])
        raise InputError(f"duplicate images with different labels: {a} and {b} (set data.duplicates=drop to "
                         f"leave such groups out; {len(conflicting)} group(s) conflict)")
    if not found.groups:
        return raw, summary
    if policy == "keep":
        if conflicting:
            a, b = _two_labels(raw, conflicting[0])
            logger.warning("prepare: %d duplicate group(s) carry different labels, e.g. %s and %s; kept "
                           "(data.duplicates=keep)", len(conflicting), a, b)
        logger.warning("prepare: %d duplicate groups (%d images) kept as they are (data.duplicates=keep): a group "
                       "split across folds inflates the metrics", found.num_groups, found.num_grouped_images)
        return raw, summary
    if policy == "drop":
        return _drop(raw, found, conflicting, summary)
    return _merge(raw, found), summary


def _two_labels(raw: RawSet, group: list[int]) -> tuple[str, str]:
    first = raw.scans[group[0]]
    other = next(raw.scans[i] for i in group if raw.scans[i].label != first.label)
    name = lambda s: f"{s.source or s.id} ({raw.class_names[s.label]!r})"  # noqa: E731
    return name(first), name(other)


def _drop(raw: RawSet, found: DuplicateGroups, conflicting: list[list[int]], summary: dict) -> tuple[RawSet, dict]:
    gone = {i for g in conflicting for i in g}
    gone |= {i for g in found.groups if g not in conflicting for i in g[1:]}
    summary["num_dropped"] = len(gone)
    if conflicting:
        a, b = _two_labels(raw, conflicting[0])
        logger.warning("prepare: dropped %d duplicate group(s) whose images carry different labels, e.g. %s and %s",
                       len(conflicting), a, b)
    logger.warning("prepare: dropped %d duplicate image(s), one kept per group (data.duplicates=drop)", len(gone))
    kept = [s for i, s in enumerate(raw.scans) if i not in gone]
    if len({s.label for s in kept}) < len({s.label for s in raw.scans}):
        raise InputError("data.duplicates=drop left a class without images; use data.duplicates=group")
    return replace(raw, scans=kept), summary


def _merge(raw: RawSet, found: DuplicateGroups) -> RawSet:
    """Union of subjects: two subjects that share a duplicate group become one (the first in sort order)."""
    parent: dict[str, str] = {s.subject: s.subject for s in raw.scans}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for g in found.groups:
        subjects = sorted({raw.scans[i].subject for i in g})
        for other in subjects[1:]:
            a, b = root(subjects[0]), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    scans = [replace(s, subject=root(s.subject)) for s in raw.scans]
    merged = len(parent) - len({root(x) for x in parent})
    logger.info("prepare: %d duplicate groups (%d images) grouped; %d subjects merged into others",
                found.num_groups, found.num_grouped_images, merged)
    return replace(raw, scans=scans)
