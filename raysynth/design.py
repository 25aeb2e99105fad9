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

from raysynth.artifacts import fraction_key, sample_index
from raysynth.config import Config, StudyConfig
from raysynth.data.schema import ImageSet
from raysynth.downstream.augment import build_classical_augment
from raysynth.errors import StageError
from raysynth.runtime import derive_seed

SYNTHETIC_ARMS = StudyConfig.SYNTHETIC_ARMS
CLASSICAL_ARMS = StudyConfig.CLASSICAL_ARMS
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
    def pretrains(self) -> bool:
        """Synthetic data first (the whole schedule), then fine-tuning on the real data alone."""
        return self.arm == "synthetic_pretrain"

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


def scarcity_subsets(cfg: Config, splits: list[dict], labels_by_id: dict[str, int],
                     subjects_by_id: dict[str, str], fractions: Optional[list[float]] = None) -> dict:
    """The ``subsets.json`` record: the real training subset of every (fold, fraction).

    Deterministic from the splits and ``cv.seed``: a fraction's subset does not depend on which
    other fractions are asked for, so prepare can add fractions to the record without moving any.
    ``fractions`` default to 1 and ``study.real_fractions``.
    """
    fractions = sorted(set(cfg.study.real_fractions if fractions is None else fractions) | {1.0})
    folds = []
    for split in splits:
        k = int(split["fold"])
        by_p = nested_subsets(list(split["train"]), labels_by_id, subjects_by_id, fractions,
                              seed=derive_seed(cfg.cv.seed, k, 17) % 2**32)
        folds.append({"fold": k, "test": list(split["test"]), "subsets": {fraction_key(p): ids for p, ids in by_p.items()}})
    return {
        "method": "per fold: each class's subjects in one seeded order; fraction p keeps the first "
                  "round(p x n_class) subjects (>= 1), so subsets are nested and stratified",
        "seed": cfg.cv.seed,
        "folds": sorted(folds, key=lambda f: f["fold"]),
    }


def generator_train_ids(cfg: Config, fold: dict, labels_by_id: dict[str, int]) -> list[str]:
    """The real ids fold k's generator may see: ``fold["train"]`` (the fold's training part, or
    one real fraction's subset of it), optionally capped.

    The cap (``diffusion.max_train_images``; the paper trained on 350 scans) keeps the class
    proportions and is seeded, so the same fold always gets the same subset.
    """
    from sklearn.model_selection import train_test_split

    train = list(fold["train"])
    cap = cfg.diffusion.max_train_images
    if cap is None or cap >= len(train):
        return train
    labels = [labels_by_id[i] for i in train]
    kept, _ = train_test_split(
        train, train_size=cap, stratify=labels, random_state=derive_seed(cfg.seed, fold["fold"], 7) % 2**31
    )
    return sorted(kept)


# ---- synthetic counts and training sets -------------------------------------------------------

def largest_remainder(weights: dict[int, float], total: int) -> dict[int, int]:
    """``total`` split over keys in proportion to ``weights``, rounding by largest remainder (ties:
    the smaller key first), so the parts add up to ``total`` exactly."""
    norm = sum(weights.values())
    exact = {c: total * w / norm for c, w in weights.items()}
    counts = {c: int(math.floor(v)) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: (counts[c] - exact[c], c))[: total - sum(counts.values())]:
        counts[c] += 1
    return counts


def class_counts(cfg: Config, real_counts: dict[int, int], num_samples: Optional[int],
                 ratio: Optional[float] = None) -> dict[int, int]:
    """How many synthetic samples each class gets.

    ``balanced``: every class gets ``ratio x`` the largest real class (or an equal share of
    ``num_samples``), which also rebalances a skewed real set. ``proportional``: each class gets
    ``ratio x`` its own real count (or its share of ``num_samples``). ``ratio`` defaults to
    ``sampling.ratio``.
    """
    classes = sorted(real_counts)
    total = cfg.sampling.num_samples if num_samples is None else num_samples
    if total is None:
        return synthetic_counts(real_counts, cfg.sampling.ratio if ratio is None else ratio, cfg.sampling.class_balance)
    if cfg.sampling.class_balance == "balanced":
        base, extra = divmod(total, len(classes))
        return {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}
    return largest_remainder({c: real_counts[c] for c in classes}, total)


def synthetic_counts(real_counts: dict[int, int], ratio: float, class_balance: str) -> dict[int, int]:
    """``n_c(ratio)`` per class: ``ratio x`` the largest real class (``balanced``) or ``ratio x``
    the class's own real count (``proportional``). Non-decreasing in ``ratio``, hence nesting."""
    if class_balance == "balanced":
        top = max(real_counts.values())
        return {c: int(round(ratio * top)) for c in sorted(real_counts)}
    return {c: int(round(ratio * real_counts[c])) for c in sorted(real_counts)}


def first_per_class(synthetic, counts: dict[int, int], curated: bool = False):
    """The samples with index ``j < counts[c]`` of each class c (an ImageSet), or None if empty.

    Raises StageError when the sampled set is smaller than asked: the arm would silently run at
    a lower ratio than it claims. A ``curated`` set has gaps where curation dropped samples: it
    gives the first ``counts[c]`` kept samples of each class in index order (so ratios still nest),
    or all of them when fewer were kept; the caller records the shortfall.
    """
    keep = []
    for c, n in counts.items():
        have = sorted((sample_index(sid), i) for i, sid in enumerate(synthetic.ids) if int(synthetic.labels[i]) == c)
        if curated:
            keep += [i for _, i in have[:n]]
            continue
        if len(have) < n or (n and have[n - 1][0] != n - 1):
            raise StageError(f"study: class {c} needs synthetic samples 0..{n - 1}, but only {len(have)} were sampled; "
                             f"rerun `raysynth sample` (it samples at the largest study ratio)")
        keep += [i for _, i in have[:n]]
    return synthetic.select(sorted(keep)) if keep else None


def training_set(condition: Condition, real, synthetic):
    """What a condition trains on: the real subset, the selected synthetic set, or both. (A
    pretraining condition trains on the real subset here; its synthetic set is its pretraining set.)"""
    parts = []
    if condition.uses_real:
        parts.append(real)
    if condition.uses_synthetic and synthetic is not None and not condition.pretrains:
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
    return build_classical_augment(dims, seed, segmentation)
