"""Cross-validation folds: stratified by label, grouped by subject, seeded, written once.

Every arm and seed of the study reads the same folds from ``splits.json``, so a baseline and an
augmented model of one fold differ only in their training data.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from raysynth.errors import InputError


def make_splits(
    labels: Sequence[int] | np.ndarray,
    subjects: Sequence[str],
    folds: int,
    repeats: int = 1,
    seed: int = 0,
    ids: Optional[Sequence[str]] = None,
    class_names: Optional[Sequence[str]] = None,
) -> list[dict]:
    """``folds * repeats`` train/test splits.

    Args:
        labels: ``(N,)`` class index per record (stratification).
        subjects: ``(N,)`` subject per record; all records of a subject land on the same side.
        folds: folds per repeat (>= 2).
        repeats: independent reshuffles; repeat ``r`` uses seed ``seed + r``.
        seed: base seed; the same inputs and seed always give the same folds.
        ids: ``(N,)`` record ids to list; defaults to the positions ``0..N-1``.
        class_names: names for error messages.

    Returns:
        ``[{"fold": k, "repeat": r, "train": [...], "test": [...]}, ...]`` with ``k`` running
        over ``0 .. folds * repeats - 1``. Within a repeat the test parts partition the records.

    Raises:
        InputError: a class has fewer subjects than ``folds`` (it cannot appear in every test fold).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if len(subjects) != n or (ids is not None and len(ids) != n):
        raise ValueError(f"make_splits: labels ({n}), subjects ({len(subjects)}) and ids "
                         f"({None if ids is None else len(ids)}) must have one entry per record")
    if folds < 2:
        raise ValueError(f"folds: {folds} must be >= 2")
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} must be >= 1")
    names = list(class_names) if class_names is not None else None
    per_class = Counter(label for _, label in {(str(s), int(y)) for s, y in zip(subjects, labels)})
    for label in range(len(names) if names else 0):  # a named class with no records at all
        per_class.setdefault(label, 0)
    for label, count in sorted(per_class.items()):
        if count < folds:
            name = names[label] if names and 0 <= label < len(names) else str(label)
            raise InputError(f"class {name!r} has {count} subject(s), fewer than cv.folds={folds}; "
                             f"add data or lower cv.folds")
    keys = list(ids) if ids is not None else list(range(n))
    groups = np.asarray([str(s) for s in subjects])
    out = []
    for r in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for k, (train, test) in enumerate(splitter.split(np.zeros(n), labels, groups)):
            # Sorted positions: the listing order never depends on sklearn's internal order.
            out.append({"fold": r * folds + k, "repeat": r,
                        "train": [keys[i] for i in np.sort(train)], "test": [keys[i] for i in np.sort(test)]})
    return out


def holdout_split(labels: Sequence[int] | np.ndarray, subjects: Sequence[str], fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``(kept, held_out)``: about ``fraction`` of the records held out, stratified by
    label and grouped by subject (slices or near-duplicates of one subject stay on one side).

    The held-out part is one fold of ``round(1 / fraction)`` stratified group folds, seeded.
    Raises :class:`InputError` when there are fewer subjects than that.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: {fraction} must lie strictly between 0 and 1")
    labels = np.asarray(labels, dtype=np.int64)
    n_splits = max(2, round(1.0 / fraction))
    if len(set(subjects)) < n_splits:
        raise InputError(f"{len(set(subjects))} subject(s) cannot give a {fraction:g} held-out part; add data")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed % 2**31)
    kept, held = next(splitter.split(np.zeros(len(labels)), labels, np.asarray([str(s) for s in subjects])))
    return np.sort(kept), np.sort(held)
