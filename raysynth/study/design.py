"""The study design: conditions (arm x ratio), real-data fractions, and what each trial trains on.

Every condition of one (fraction, fold, seed) cell uses the same real subset, test fold and
seed, so two conditions differ only in what the design below adds or removes:

- ``baseline``: the real subset. ``classical``: the same, with random MRI transforms per batch.
- ``synthetic`` at ratio r: the real subset plus ``n_c(r)`` synthetic samples of each class c from
  the generator of (fold, fraction), which trained on that real subset only.
  ``synthetic+classical``: the same set, augmented. ``synthetic_only``: the synthetic part alone.
- ``n_c(r)`` counts per *real* sample of the subset (``sampling.class_balance`` decides per class
  or per largest class). The generator is sampled once at the largest ratio, and sample j of a
  class never depends on the set's size, so ratio r takes the first ``n_c(r)`` samples of each
  class and smaller ratios are nested in larger ones.

Scarcity subsets are nested and stratified: per fold, each class's subjects are put in one
seeded order and fraction p keeps the first ``round(p x n_c)`` of them (at least one), so
10% is inside 25% is inside 100%, every class keeps its share, and all records of a subject
stay together. They are drawn from the fold's training part only, so they never touch its test part.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from raysynth.config import Config
from raysynth.errors import StageError
from raysynth.layout import Layout, read_json, write_json
from raysynth.runtime import derive_seed

SYNTHETIC_ARMS = ("synthetic", "synthetic+classical", "synthetic_only")
CLASSICAL_ARMS = ("classical", "synthetic+classical")
BASELINE = "baseline"


@dataclass(frozen=True)
class Condition:
    """One arm of the study; synthetic arms come once per ratio."""

    arm: str
    ratio: Optional[float] = None

    @property
    def name(self) -> str:
        return self.arm if self.ratio is None else f"{self.arm} x{self.ratio:g}"

    @property
    def uses_real(self) -> bool:
        return self.arm != "synthetic_only"

    @property
    def uses_synthetic(self) -> bool:
        return self.arm in SYNTHETIC_ARMS

    @property
    def uses_classical(self) -> bool:
        return self.arm in CLASSICAL_ARMS


def conditions(cfg: Config) -> list[Condition]:
    ratios = cfg.study.ratios_for(cfg.sampling.ratio)
    out: list[Condition] = []
    for arm in cfg.study.arms:
        out += [Condition(arm, float(r)) for r in ratios] if arm in SYNTHETIC_ARMS else [Condition(arm)]
    return out


def needs_synthetic(cfg: Config) -> bool:
    return any(a in SYNTHETIC_ARMS for a in cfg.study.arms)


def largest_ratio(cfg: Config) -> float:
    return max(cfg.study.ratios_for(cfg.sampling.ratio))


def generator_fractions(cfg: Config) -> list[float]:
    """Fractions that get a generator: always the full training part (quality reads it), and the
    smaller fractions only when a synthetic arm will use them."""
    smaller = sorted((p for p in cfg.study.real_fractions if p < 1.0), reverse=True) if needs_synthetic(cfg) else []
    return [1.0] + smaller


def fraction_key(fraction: float) -> str:
    """The JSON key of a fraction: "1", "0.25"."""
    return f"{fraction:g}"


# ---- scarcity subsets -------------------------------------------------------------------------

def nested_subsets(train_ids: list[str], labels_by_id: dict[str, int], subjects_by_id: dict[str, str],
                   fractions: list[float], seed: int) -> dict[float, list[str]]:
    """Nested, stratified, subject-grouped subsets of ``train_ids``: ``{fraction: sorted ids}``."""
    # 1. One label per subject (its most common record label) for stratification.
    by_subject: dict[str, list[str]] = defaultdict(list)
    for rid in train_ids:
        by_subject[subjects_by_id[rid]].append(rid)
    subject_label = {s: Counter(labels_by_id[r] for r in rids).most_common(1)[0][0] for s, rids in by_subject.items()}
    # 2. One seeded order of each class's subjects; every fraction takes a prefix of it (nesting).
    rng = np.random.default_rng(seed)
    order: dict[int, list[str]] = {}
    for c in sorted(set(subject_label.values())):
        subjects = sorted(s for s, lab in subject_label.items() if lab == c)
        order[c] = [subjects[i] for i in rng.permutation(len(subjects))]
    out = {}
    for p in fractions:
        kept = [s for c, subjects in order.items() for s in subjects[:_share(p, len(subjects))]]
        out[p] = sorted(r for s in kept for r in by_subject[s])
    return out


def _share(fraction: float, n: int) -> int:
    return n if fraction >= 1.0 else max(1, min(n, math.floor(fraction * n + 0.5)))


def scarcity_subsets(cfg: Config, layout: Layout, splits: list[dict], labels_by_id: dict[str, int],
                     subjects_by_id: dict[str, str]) -> dict[int, dict[float, list[str]]]:
    """The real training subset of every (fold, fraction), recorded in ``prepared/subsets.json``.

    Deterministic from the splits and ``cv.seed``; the file is rewritten only when its content
    would change (new fractions, or new splits), so a fraction's subset is stable across runs.
    """
    fractions = sorted(set(cfg.study.real_fractions) | {1.0})
    out = {}
    for split in splits:
        k = int(split["fold"])
        out[k] = nested_subsets(list(split["train"]), labels_by_id, subjects_by_id, fractions,
                                seed=derive_seed(cfg.cv.seed, k, 17) % 2**32)
    record = {
        "method": "per fold: each class's subjects in one seeded order; fraction p keeps the first "
                  "round(p x n_class) subjects (>= 1), so subsets are nested and stratified",
        "seed": cfg.cv.seed,
        "folds": [{"fold": k, "test": list(next(s for s in splits if int(s["fold"]) == k)["test"]),
                   "subsets": {fraction_key(p): ids for p, ids in by_p.items()}} for k, by_p in sorted(out.items())],
    }
    # Keep any other fractions already on file: they are recomputed the same way, so still valid.
    if layout.subsets.is_file():
        old = read_json(layout.subsets)
        if old.get("seed") == cfg.cv.seed and [f["test"] for f in old.get("folds", [])] == [f["test"] for f in record["folds"]]:
            for new, prev in zip(record["folds"], old["folds"]):
                new["subsets"] = {**prev["subsets"], **new["subsets"]}
            if old == record:
                return out
    write_json(layout.subsets, record)
    return out


# ---- synthetic counts and training sets -------------------------------------------------------

def synthetic_counts(real_counts: dict[int, int], ratio: float, class_balance: str) -> dict[int, int]:
    """``n_c(ratio)`` per class: ``ratio x`` the largest real class (``balanced``) or ``ratio x``
    the class's own real count (``proportional``). Non-decreasing in ``ratio``, hence nesting."""
    if class_balance == "balanced":
        top = max(real_counts.values())
        return {c: int(round(ratio * top)) for c in sorted(real_counts)}
    return {c: int(round(ratio * real_counts[c])) for c in sorted(real_counts)}


def sample_index(sample_id: str) -> int:
    """``syn-f0-c1-0000007`` -> 7: a sample's index within its class."""
    return int(sample_id.rsplit("-", 1)[1])


def first_per_class(synthetic, counts: dict[int, int]):
    """The samples with index ``j < counts[c]`` of each class c (an ImageSet), or None if empty.

    Raises StageError when the sampled set is smaller than asked: the arm would silently run at
    a lower ratio than it claims.
    """
    keep = []
    for c, n in counts.items():
        have = sorted((sample_index(sid), i) for i, sid in enumerate(synthetic.ids) if int(synthetic.labels[i]) == c)
        if len(have) < n or (n and have[n - 1][0] != n - 1):
            raise StageError(f"study: class {c} needs synthetic samples 0..{n - 1}, but only {len(have)} were sampled; "
                             f"rerun `raysynth sample` (it samples at the largest study ratio)")
        keep += [i for _, i in have[:n]]
    return synthetic.select(sorted(keep)) if keep else None


def training_set(condition: Condition, real, synthetic):
    """What a condition trains on: the real subset, the selected synthetic set, or both."""
    from raysynth.data.schema import ImageSet

    parts = []
    if condition.uses_real:
        parts.append(real)
    if condition.uses_synthetic and synthetic is not None:
        # Synthetic records carry the generator's spacing; the real subset's is authoritative.
        parts.append(ImageSet(synthetic.ids, synthetic.subjects, synthetic.labels, synthetic.images, synthetic.masks,
                              spacing=real.spacing))
    if not parts:
        raise StageError(f"study: condition {condition.name!r} has no training data")
    return parts[0] if len(parts) == 1 else ImageSet.concat(parts)


def augment_for(condition: Condition, dims: int, seed: int, segmentation: bool) -> Optional[Callable]:
    """The classical MRI augmentation of the classical arms (seeded per trial), else None."""
    if not condition.uses_classical:
        return None
    from raysynth.study.augment import build_classical_augment

    return build_classical_augment(dims, seed, segmentation)
