"""The study design: what each arm trains on, nested ratios and scarcity subsets, and the full
design end to end on the smoke preset (two real fractions, synthetic arms with two ratios)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysynth.cli import main
from raysynth.config import ConfigError, StudyConfig, load_config
from raysynth.data.schema import ImageSet
from raysynth.artifacts import sample_id
from raysynth.design import class_counts
from raysynth.artifacts import Layout, fraction_tag, read_json
from raysynth.downstream.augment import ClassicalAugment
from raysynth.design import (
    Condition, augment_for, conditions, first_per_class, generator_fractions, nested_subsets, synthetic_counts,
    training_set,
)


def _records(n_per_class=(30, 20, 10), subjects_per_record=1, prefix="r"):
    ids, subjects, labels = [], [], []
    for c, n in enumerate(n_per_class):
        for i in range(n):
            ids.append(f"{prefix}{c}-{i}")
            subjects.append(f"s{c}-{i // subjects_per_record}")
            labels.append(c)
    return ids, subjects, np.array(labels)


def _synthetic(per_class: dict[int, int], fold=0, fraction=1.0, size=16) -> ImageSet:
    ids, labels = [], []
    for c, n in per_class.items():
        for j in range(n):
            ids.append(sample_id(fold, c, j, fraction))
            labels.append(c)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ids))  # shards come back in any order
    return ImageSet([ids[i] for i in order], ["synthetic"] * len(ids), np.array(labels)[order],
                    rng.uniform(-1, 1, (len(ids), 1, size, size)).astype(np.float32))


def _real(n_per_class=(6, 4), size=16) -> ImageSet:
    ids, subjects, labels = _records(n_per_class)
    return ImageSet(ids, subjects, labels, np.zeros((len(ids), 1, size, size), np.float32), spacing=(0.5, 0.5))


# ---- config and layout -------------------------------------------------------------------------

def test_unknown_arm_is_rejected_with_the_valid_names():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", None, ["study.arms=[baseline,augmented]"])
    assert "augmented" in str(err.value)
    assert all(name in str(err.value) for name in StudyConfig.ARMS)


@pytest.mark.parametrize("override", ["study.real_fractions=[0]", "study.real_fractions=[1.5]",
                                      "study.real_fractions=[]", "study.real_fractions=[0.5,0.5]",
                                      "study.ratios=[0]", "study.ratios=[]", "study.ratios=[1,1]",
                                      "study.arms=[baseline,baseline]"])
def test_invalid_study_design_is_rejected(override):
    with pytest.raises(ConfigError, match="study."):
        load_config("smoke", None, [override])


def test_default_design_is_cheap_and_keeps_a_ratio_one_synthetic_arm():
    cfg = load_config("default")
    assert [c.name for c in conditions(cfg)] == ["baseline", "synthetic x1"]
    assert cfg.study.real_fractions == [1.0] and generator_fractions(cfg) == [1.0]


def test_conditions_expand_synthetic_arms_over_ratios():
    cfg = load_config("smoke", None, ["study.arms=[baseline,classical,synthetic,synthetic+classical,synthetic_only]",
                                      "study.ratios=[0.5,1,2,4]", "study.real_fractions=[0.1,0.25,0.5,1.0]"])
    names = [c.name for c in conditions(cfg)]
    assert names[:2] == ["baseline", "classical"] and len(names) == 2 + 3 * 4
    assert "synthetic+classical x0.5" in names and "synthetic_only x4" in names
    assert generator_fractions(cfg) == [1.0, 0.5, 0.25, 0.1]
    # Without a synthetic arm no smaller generator is trained.
    assert generator_fractions(load_config("smoke", None, ["study.arms=[baseline,classical]",
                                                           "study.real_fractions=[0.5,1.0]"])) == [1.0]


@pytest.mark.parametrize("fraction, tag", [(1.0, ""), (0.25, "_p25"), (0.1, "_p10"), (0.125, "_p12_5")])
def test_layout_of_fractions_keeps_full_size_paths(tmp_path, fraction, tag):
    L = Layout.at(tmp_path)
    assert fraction_tag(fraction) == tag
    assert L.ddpm(2, fraction) == tmp_path / "ddpm" / f"fold_2{tag}"
    assert L.synthetic(2, fraction) == tmp_path / "synthetic" / f"fold_2{tag}"
    assert L.ddpm(2) == L.ddpm(2, 1.0) == tmp_path / "ddpm" / "fold_2"


# ---- scarcity subsets --------------------------------------------------------------------------

def test_scarcity_subsets_are_nested_stratified_and_seeded():
    ids, subjects, labels = _records((40, 20, 12))
    train = ids[::2] + ids[1::4]  # some training part; the rest plays the test part
    test = sorted(set(ids) - set(train))
    lab, subj = dict(zip(ids, labels.tolist())), dict(zip(ids, subjects))
    fractions = [0.1, 0.25, 0.5, 1.0]
    subsets = nested_subsets(train, lab, subj, fractions, seed=3)
    assert subsets[1.0] == sorted(train)
    for small, big in zip(fractions, fractions[1:]):
        assert set(subsets[small]) < set(subsets[big])
    full = Counter(lab[i] for i in train)
    for p in fractions:
        assert not set(subsets[p]) & set(test)
        counts = Counter(lab[i] for i in subsets[p])
        assert set(counts) == set(full)  # every class keeps at least one record
        for c, n in full.items():
            assert abs(counts[c] - p * n) <= 0.5 + 1e-9 or counts[c] == 1
    assert nested_subsets(train, lab, subj, fractions, seed=3) == subsets
    assert nested_subsets(train, lab, subj, fractions, seed=4)[0.25] != subsets[0.25]


def test_scarcity_subsets_keep_a_subjects_records_together():
    ids, subjects, labels = _records((24, 24), subjects_per_record=3)
    subsets = nested_subsets(ids, dict(zip(ids, labels.tolist())), dict(zip(ids, subjects)), [0.25, 0.5], seed=0)
    subject = dict(zip(ids, subjects))
    for p, kept in subsets.items():
        kept_subjects = {subject[i] for i in kept}
        assert sorted(kept) == sorted(i for i in ids if subject[i] in kept_subjects)
        assert len(kept_subjects) == 2 * round(p * 8)


# ---- synthetic ratios and training sets --------------------------------------------------------

@pytest.mark.parametrize("balance", ["balanced", "proportional"])
def test_smaller_ratios_take_nested_prefixes_of_each_class(balance):
    real = {0: 6, 1: 4}
    ratios = [0.5, 1, 2, 4]
    counts = {r: synthetic_counts(real, r, balance) for r in ratios}
    pool = _synthetic(counts[4])
    chosen = {r: first_per_class(pool, counts[r]) for r in ratios}
    for r in ratios:
        got = Counter(chosen[r].labels.tolist())
        assert dict(got) == {c: n for c, n in counts[r].items() if n}
        for c in real:  # exactly the first n_c(r) samples of the class
            idx = sorted(int(i.rsplit("-", 1)[1]) for i, lab in zip(chosen[r].ids, chosen[r].labels) if lab == c)
            assert idx == list(range(counts[r][c]))
    for small, big in zip(ratios, ratios[1:]):
        assert set(chosen[small].ids) < set(chosen[big].ids)
    expected_top = {"balanced": {0: 24, 1: 24}, "proportional": {0: 24, 1: 16}}[balance]
    assert counts[4] == expected_top


def test_sampling_stage_and_study_agree_on_counts():
    cfg = load_config("smoke", None, ["study.ratios=[0.5,3]"])
    real = {0: 7, 1: 5}
    assert class_counts(cfg, real, None, ratio=3) == synthetic_counts(real, 3, cfg.sampling.class_balance)


def test_a_ratio_larger_than_what_was_sampled_is_an_error():
    pool = _synthetic({0: 3, 1: 3})
    with pytest.raises(Exception, match="only 3 were sampled"):
        first_per_class(pool, {0: 4, 1: 3})


def test_arm_training_sets():
    real, synthetic = _real((6, 4)), _synthetic({0: 6, 1: 6})
    sizes = {}
    for arm in StudyConfig.ARMS:
        cond = Condition(arm, 1.0 if arm.startswith("synthetic") else None)
        data = training_set(cond, real, synthetic if cond.uses_synthetic else None)
        sizes[arm] = len(data)
        real_ids = set(real.ids) & set(data.ids)
        if arm == "synthetic_only":
            assert not real_ids and set(data.subjects) == {"synthetic"}  # no real data at all
        else:
            assert real_ids == set(real.ids)
        assert data.spacing == real.spacing
    # synthetic_pretrain fine-tunes on the real data alone (its synthetic set is the pretraining set)
    assert sizes == {"baseline": 10, "classical": 10, "synthetic": 22, "synthetic+classical": 22, "synthetic_only": 12,
                     "synthetic_pretrain": 10}


def test_only_classical_arms_augment_and_the_augmentation_changes_images():
    for arm in StudyConfig.ARMS:
        cond = Condition(arm, 1.0 if arm.startswith("synthetic") else None)
        aug = augment_for(cond, dims=2, seed=0, segmentation=False)
        assert (aug is not None) == (arm in ("classical", "synthetic+classical"))
    aug = augment_for(Condition("classical"), dims=2, seed=0, segmentation=False)
    assert isinstance(aug, ClassicalAugment)
    import torch

    x = torch.linspace(-1, 1, 16 * 16).reshape(1, 1, 16, 16).repeat(8, 1, 1, 1)
    y, _ = aug(x)
    assert y.shape == x.shape and not torch.allclose(x, y)


# ---- the full design end to end ----------------------------------------------------------------

# Two real fractions x (baseline + synthetic-only at two ratios); the augmented arms are covered above.
FULL = ["--set", "study.arms=[baseline,synthetic_only,synthetic_pretrain]", "--set", "study.ratios=[0.5,1]",
        "--set", "study.real_fractions=[0.5,1.0]", "--set", "diffusion.train_steps=10",
        "--set", "diffusion.checkpoint_every=10", "--set", "study.epochs=1", "--set", "sampling.steps=3",
        "--set", "quality.encoder_epochs=1"]


@pytest.mark.slow
def test_full_design_end_to_end(ray_session, tmp_path):
    out = tmp_path / "full"
    assert main(["pipeline", "--preset", "smoke", "--out", str(out), "-q", *FULL]) == 0
    L = Layout.at(out)
    cfg = load_config("smoke", None, [FULL[i + 1] for i in range(0, len(FULL), 2)])
    splits = read_json(L.splits)["folds"]
    subsets = {f["fold"]: f["subsets"] for f in read_json(L.subsets)["folds"]}
    labels = dict(zip(*_ids_labels(L)))

    for split in splits:
        k, sub = split["fold"], subsets[split["fold"]]
        assert set(sub["0.5"]) < set(sub["1"]) == set(split["train"])  # nested, inside the training part
        for p in (0.5, 1.0):
            ids = read_json(L.ddpm(k, p) / "train_ids.json")
            assert ids["fraction"] == p
            assert set(ids["train_ids"]) <= set(sub[f"{p:g}"])  # the generator saw only its size's subset
            assert not set(ids["train_ids"]) & set(split["test"])
            manifest = read_json(L.synthetic(k, p) / "manifest.json")
            assert all(s["id"].startswith(f"syn-f{k}{fraction_tag(p)}-c") for s in manifest["samples"])
            real_counts = Counter(labels[i] for i in sub[f"{p:g}"])
            assert sum(manifest["counts"].values()) == sum(synthetic_counts(real_counts, 1.0, "balanced").values())

    rows = pq.read_table(L.study / "results.parquet").to_pylist()
    assert len(rows) == len(conditions(cfg)) * 2 * len(splits) * len(cfg.study.seeds)
    for r in rows:
        k, p = r["fold"], r["real_fraction"]
        n_real = len(subsets[k][f"{p:g}"])
        real_counts = Counter(labels[i] for i in subsets[k][f"{p:g}"])
        n_syn = sum(synthetic_counts(real_counts, r["ratio"], "balanced").values()) if r["ratio"] else 0
        assert r["n_real"] == (0 if r["arm"] == "synthetic_only" else n_real)
        assert r["n_synthetic"] == n_syn
        assert r["n_test"] == len(next(s for s in splits if s["fold"] == k)["test"])
    preds = pq.read_table(L.study / "predictions.parquet").to_pylist()
    assert {(p["condition"], p["real_fraction"]) for p in preds} == {(r["condition"], r["real_fraction"]) for r in rows}

    report = read_json(L.report / "report.json")
    assert set(report["comparisons"]) == {"0.5", "1"}
    assert set(report["comparisons"]["0.5"]) == {"synthetic_only x0.5", "synthetic_only x1",
                                                 "synthetic_pretrain x0.5", "synthetic_pretrain x1"}
    comp = report["comparisons"]["0.5"]["synthetic_only x1"]["balanced_accuracy"]
    assert comp["n"] == len(splits) and {"nb_p", "t_p", "wilcoxon_p", "boot_ci_low", "nb_p_holm"} <= set(comp)
    assert "against real-data size" in (L.report / "report.html").read_text()
    assert (L.report / "learning_curve_balanced_accuracy.png").is_file() and (L.report / "roc.png").is_file()


def _ids_labels(L: Layout):
    table = pq.read_table(L.data_parquet, columns=["id", "label"]).to_pydict()
    return table["id"], table["label"]
