"""The ``tune`` stage: settings, split, search space and best config (fast), and one real Ray Tune run (slow)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysynth.config import load_config
from raysynth.stages.tune import (
    DEFAULT_SETTINGS,
    best_config,
    resolve_settings,
    search,
    search_space,
    tune_digest,
    validation_split,
)
from raysynth.artifacts import TUNE_FILES as FILES
from raysynth.design import largest_remainder as eval_label_counts
from raysynth.diffusion.tune_trial import trial_diffusion
from raysynth.errors import StageError
from raysynth.artifacts import Layout, read_json

SMOKE_SETTINGS = {"num_samples": 3, "trial_steps": 6, "eval_every": 2, "grace_period": 2, "reduction_factor": 2.0,
                  "eval_samples": 8, "eval_steps": 2, "processes": ["ddpm", "gamma"], "gamma_min": 5.0,
                  "gamma_max": 500.0, "lr_min": 1e-4, "lr_max": 1e-3}


# ---- settings -----------------------------------------------------------------------------------

def test_settings_defaults_and_override():
    s = resolve_settings({"num_samples": 2, "processes": ["gamma", "gamma", "ddpm"]})
    assert s["num_samples"] == 2 and s["trial_steps"] == DEFAULT_SETTINGS["trial_steps"]
    assert s["processes"] == ["gamma", "ddpm"]


def test_unknown_setting_names_key_and_lists_valid():
    with pytest.raises(ValueError, match=r"'num_trials'.*valid keys: \[.*'num_samples'"):
        resolve_settings({"num_trials": 3})


@pytest.mark.parametrize("bad", [
    {"gamma_min": 10.0, "gamma_max": 5.0}, {"lr_min": 0.0}, {"processes": ["vp"]}, {"processes": []},
    {"gamma_sampler": "ddim"}, {"ddpm_sampler": "heun"}, {"eval_every": 500, "trial_steps": 400},
    {"grace_period": 0}, {"reduction_factor": 1.0}, {"val_fraction": 1.0}, {"eval_samples": 1}, {"num_samples": True},
])
def test_invalid_settings_name_the_key(bad):
    key = next(k for k in bad if k != "trial_steps")
    with pytest.raises(ValueError, match=f"tune.{key}"):
        resolve_settings(bad)


# ---- pure parts ---------------------------------------------------------------------------------

def test_validation_split_is_stratified_grouped_disjoint_and_seeded():
    subjects = [f"sub{i // 2}" for i in range(80)]  # two slices per subject
    ids = [f"{s}_z{i % 2}" for i, s in enumerate(subjects)]
    labels = np.array([(i // 2) % 2 for i in range(80)])
    gen, val = validation_split(ids, labels, subjects, 0.2, seed=7)
    assert not set(gen) & set(val) and sorted(gen + val) == sorted(ids)
    assert 12 <= len(val) <= 20
    by_id = dict(zip(ids, zip(subjects, labels)))
    assert not {by_id[i][0] for i in gen} & {by_id[i][0] for i in val}  # no subject on both sides
    assert {by_id[i][1] for i in val} == {0, 1}
    assert validation_split(ids, labels, subjects, 0.2, seed=7) == (gen, val)
    assert validation_split(ids, labels, subjects, 0.2, seed=8) != (gen, val)


def test_validation_split_too_few_subjects():
    with pytest.raises(StageError, match="val_fraction"):
        validation_split(["a", "b", "c"], np.array([0, 1, 0]), ["a", "b", "c"], 0.2, seed=0)


def test_search_space_log_scale_and_process_choice():
    s = resolve_settings({"gamma_min": 1.0, "gamma_max": 10000.0})
    space = search_space(s)
    assert space["process"] == "gamma"  # one process: a constant, not a choice
    g = np.asarray(space["gamma"].sample(size=4000, random_state=0))
    assert g.min() >= 1.0 and g.max() <= 10000.0
    # log-uniform: half the mass below the geometric mean (100), a quarter below 10
    assert abs(np.mean(g < 100.0) - 0.5) < 0.04 and abs(np.mean(g < 10.0) - 0.25) < 0.04
    lr = np.asarray(space["learning_rate"].sample(size=1000, random_state=0))
    assert lr.min() >= s["lr_min"] and lr.max() <= s["lr_max"]
    both = search_space(resolve_settings({"processes": ["ddpm", "gamma"]}))
    assert set(both["process"].categories) == {"ddpm", "gamma"}


def test_trial_diffusion_uses_gamma_only_for_the_gamma_process():
    base = load_config("smoke").diffusion
    ddpm = trial_diffusion(base, {"process": "ddpm", "gamma": 99.0, "learning_rate": 1e-3})
    assert (ddpm.process, ddpm.gamma, ddpm.learning_rate) == ("ddpm", base.gamma, 1e-3)
    gamma = trial_diffusion(base, {"process": "gamma", "gamma": 99.0, "learning_rate": 1e-3})
    assert (gamma.process, gamma.gamma) == ("gamma", 99.0)


def test_digest_follows_settings_and_config():
    cfg, s = load_config("smoke"), resolve_settings(SMOKE_SETTINGS)
    assert tune_digest(cfg, s) == tune_digest(load_config("smoke"), resolve_settings(SMOKE_SETTINGS))
    assert tune_digest(cfg, resolve_settings({**SMOKE_SETTINGS, "num_samples": 4})) != tune_digest(cfg, s)
    assert tune_digest(load_config("smoke", overrides=["diffusion.batch_size=8"]), s) != tune_digest(cfg, s)
    # the searched fields do not matter: best.yaml run through tune again is up to date
    searched = ["diffusion.process=gamma", "sampling.sampler=heun", "diffusion.gamma=99", "diffusion.learning_rate=1e-3"]
    assert tune_digest(load_config("smoke", overrides=searched), s) == tune_digest(cfg, s)


def test_eval_label_counts_follow_validation_proportions():
    assert eval_label_counts({0: 3, 1: 2}, 8) == {0: 5, 1: 3}
    assert eval_label_counts({0: 5, 1: 5}, 7) in ({0: 4, 1: 3}, {0: 3, 1: 4})
    assert sum(eval_label_counts({0: 1, 1: 1, 2: 1}, 10).values()) == 10


@pytest.mark.parametrize("process, gamma, cfg_sampler, expected", [
    ("gamma", 37.5, "ddim", "heun"),      # ddim does not fit the gamma process: fall back
    ("ddpm", 37.5, "dpmsolver++", "dpmsolver++"),  # a valid sampler is kept
    ("gamma", 37.5, "euler", "euler"),
])
def test_best_config_writes_a_loadable_yaml(tmp_path, process, gamma, cfg_sampler, expected):
    base_process = "gamma" if cfg_sampler in ("euler", "heun") else "ddpm"
    cfg = load_config("smoke", overrides=[f"diffusion.process={base_process}", f"sampling.sampler={cfg_sampler}"])
    tuned = best_config(cfg, {"process": process, "gamma": gamma, "learning_rate": 4e-4})
    path = tmp_path / "best.yaml"
    path.write_text(tuned.to_yaml())
    loaded = load_config("smoke", path)
    assert loaded.diffusion.process == process and loaded.diffusion.learning_rate == pytest.approx(4e-4)
    assert loaded.diffusion.gamma == pytest.approx(gamma if process == "gamma" else cfg.diffusion.gamma)
    assert loaded.sampling.sampler == expected
    assert loaded.diffusion.channels == cfg.diffusion.channels  # everything else untouched


def test_search_needs_prepare_and_valid_settings(tmp_path):
    cfg = load_config("smoke")
    with pytest.raises(ValueError, match="'bogus'"):
        search(cfg, Layout.at(tmp_path), settings={"bogus": 1})
    with pytest.raises(StageError, match="prepare"):
        search(cfg, Layout.at(tmp_path), settings=SMOKE_SETTINGS)


# ---- a real search on a local Ray ------------------------------------------------------------------

@pytest.mark.slow
def test_search_end_to_end(tmp_path, ray_session):
    from raysynth.stages.prepare import prepare

    cfg = load_config("smoke")
    layout = Layout.at(tmp_path)
    prepare(cfg, layout)
    summary = search(cfg, layout, settings=SMOKE_SETTINGS)
    out = tmp_path / "tune"
    assert all((out / f).is_file() and (out / f).stat().st_size > 0 for f in FILES)

    # One row per trial; ASHA's decision is recorded and consistent with the steps trained.
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert len(rows) == SMOKE_SETTINGS["num_samples"]
    for r in rows:
        assert r["status"] in ("completed", "stopped"), r
        assert (r["steps"] == 6) == (r["status"] == "completed") and r["steps"] >= 2
        assert math.isfinite(r["best_fd"]) and r["best_fd"] > 0  # generated vs real: never identical sets
        assert (r["gamma"] is None) == (r["process"] == "ddpm")
        assert 1e-4 <= r["learning_rate"] <= 1e-3
        history = json.loads(r["fd_history"])
        assert [h[0] for h in history] == list(range(2, r["steps"] + 1, 2))
        assert r["best_fd"] == pytest.approx(min(h[1] for h in history))
    best = min(rows, key=lambda r: r["best_fd"])
    assert summary["best"]["trial_id"] == best["trial_id"]
    assert sum(summary["trials"].values()) == len(rows)

    # best.yaml is a full config that `raysynth train --config` accepts, with the best trial's values.
    tuned = load_config("smoke", out / "best.yaml")
    assert tuned.diffusion.process == best["process"]
    assert tuned.diffusion.learning_rate == pytest.approx(best["learning_rate"])
    if best["process"] == "gamma":
        assert tuned.diffusion.gamma == pytest.approx(best["gamma"]) and tuned.sampling.sampler in ("euler", "heun")

    # No test data: validation ids are disjoint from fold 0's test ids and from the generator-training ids.
    saved = read_json(out / "tune.json")
    split = saved["split"]
    fold0 = next(f for f in read_json(layout.splits)["folds"] if f["fold"] == 0)
    val, gen = set(split["validation_ids"]), set(split["generator_train_ids"])
    assert val and gen and not val & set(fold0["test"]) and not gen & set(fold0["test"]) and not val & gen
    assert (val | gen) <= set(fold0["train"]) and split["n_validation"] == len(val)
    # Real vs real is positive and, after a handful of training steps, closer than any trial's samples.
    assert saved["encoder"]["kind"] == "trained" and 0 < saved["reference_fd"] < min(r["best_fd"] for r in rows)

    # Idempotent: the same config and settings skip the search.
    stamp = (out / "tune.json").stat().st_mtime_ns
    assert search(cfg, layout, settings=SMOKE_SETTINGS)["digest"] == summary["digest"]
    assert (out / "tune.json").stat().st_mtime_ns == stamp
    # ... and so does the tuned config itself: the searched fields are not part of the digest.
    assert search(tuned, layout, settings=SMOKE_SETTINGS)["digest"] == summary["digest"]
    assert (out / "tune.json").stat().st_mtime_ns == stamp
