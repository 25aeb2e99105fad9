"""One study trial: train the task CNN of (condition, real fraction, fold, seed) and score it on the real test part.

Runs in a Ray Tune worker (imports library modules only). The trial's data follows
:mod:`raysynth.design`: the fold's real subset for the fraction, plus for synthetic arms the first
``n_c(ratio)`` samples of each class from the (fold, fraction) generator, minus any ids the privacy
gate dropped. The test part is always the fold's whole real test part.
"""

from __future__ import annotations

import json
import time

import ray.tune as tune
import torch

from raysynth.artifacts import (
    Layout,
    fraction_tag,
    read_prepared,
    read_subsets,
    read_synthetic,
    trial_key,
)
from raysynth.config import Config, from_dict
from raysynth.design import (
    Condition,
    augment_for,
    first_per_class,
    synthetic_counts,
    training_set,
)
from raysynth.downstream.models import fit_and_evaluate
from raysynth.errors import StageError
from raysynth.runtime import set_threads


def trial_data(cfg: Config, layout: Layout, trial: dict, dropped: set[str]):
    """``(train, test, n_real, n_synthetic, pretrain)`` of one trial, following ``design``; ``pretrain``
    is the synthetic set of a pretraining arm (else None). With ``sampling.curate`` the pool holds
    only kept samples, and an arm short of them trains on those there are (``n_synthetic`` says how
    many)."""
    condition = Condition(trial["arm"], trial["ratio"])
    fold, fraction = int(trial["fold"]), float(trial["fraction"])
    records, fingerprint, splits = read_prepared(layout, cfg)
    split = next(s for s in splits if s["fold"] == fold)
    subset = read_subsets(layout, cfg)[fold][fraction]
    real, test = records.subset_ids(subset), records.subset_ids(split["test"])
    synthetic = None
    if condition.uses_synthetic:
        pool = read_synthetic(layout, fold, fraction=fraction, cfg=cfg)
        real_counts = {c: int((real.labels == c).sum()) for c in range(int(fingerprint["num_classes"]))}
        wanted = synthetic_counts(real_counts, condition.ratio, cfg.sampling.class_balance)
        if pool is None and cfg.sampling.curate is not None:
            raise StageError(f"study: curation kept no synthetic sample of fold {fold}{fraction_tag(fraction)}; "
                             "lower sampling.curate.threshold")
        if pool is None:
            raise StageError(f"study: fold {fold}{fraction_tag(fraction)} has no synthetic samples; run `raysynth sample`")
        synthetic = first_per_class(pool, wanted, curated=cfg.sampling.curate is not None)
        # Ids the privacy gate dropped leave after the selection, so ratio r stays a prefix.
        if synthetic is not None and dropped:
            keep = [i for i, sid in enumerate(synthetic.ids) if sid not in dropped]
            synthetic = synthetic.select(keep) if keep else None
    train = training_set(condition, real, synthetic)
    pretrain = synthetic if condition.pretrains else None
    return (train, test, (len(real) if condition.uses_real else 0), (0 if synthetic is None else len(synthetic)),
            pretrain)


def run_trial(config: dict) -> None:
    """One Tune trial: train the task CNN of (condition, fraction, fold, seed) and report its test metrics."""
    cfg = from_dict(config["cfg"])
    st = cfg.study
    set_threads(st.cpus_per_trial)
    layout = Layout.at(config["root"])
    trial = config["trial"]
    seed = int(trial["seed"])
    _, fingerprint, _ = read_prepared(layout, cfg)
    train, test, n_real, n_synthetic, pretrain = trial_data(cfg, layout, trial, set(config["dropped"]))
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
        pretrain=pretrain,
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
