"""Readers in ``raysynth.artifacts`` refuse what was made from other inputs, and prepare owns subsets.json."""

from __future__ import annotations

import pytest

from raysynth import artifacts
from raysynth.artifacts import Layout, read_prepared, read_subsets, write_json
from raysynth.config import load_config
from raysynth.errors import PrivacyGateError, StageError
from raysynth.pipeline import enforce_privacy_gate
from raysynth.stages.prepare import prepare


def smoke(*overrides: str):
    return load_config("smoke", overrides=["data.num_scans=24", *overrides])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    layout = Layout.at(tmp_path_factory.mktemp("prepared"))
    cfg = smoke("study.real_fractions=[1.0, 0.5]")
    prepare(cfg, layout)
    return cfg, layout


def test_prepared_data_is_checked_against_the_config(prepared):
    cfg, layout = prepared
    records, fingerprint, folds = read_prepared(layout, cfg)
    assert len(records) == 24 and len(folds) == cfg.cv.folds
    with pytest.raises(StageError, match="another data/cv config"):
        read_prepared(layout, smoke("cv.folds=3"))


def test_prepare_writes_every_fraction_and_adds_new_ones_without_moving_old(prepared):
    cfg, layout = prepared
    subsets = read_subsets(layout, cfg)
    assert set(subsets[0]) == {1.0, 0.5} and set(subsets[0][0.5]) <= set(subsets[0][1.0])
    wider = smoke("study.real_fractions=[1.0, 0.5, 0.25]")
    with pytest.raises(StageError, match="no subset for real fraction 0.25"):
        read_subsets(layout, wider)
    before = layout.data_parquet.stat().st_mtime_ns
    prepare(wider, layout)  # the rest is up to date: only subsets.json grows
    assert layout.data_parquet.stat().st_mtime_ns == before
    again = read_subsets(layout, wider)
    assert again[0][0.5] == subsets[0][0.5] and set(again[0][0.25]) <= set(again[0][0.5])


def test_generator_and_manifest_readers_refuse_stale_artifacts(tmp_path):
    layout, cfg = Layout.at(tmp_path), smoke()
    with pytest.raises(StageError, match="raysynth train"):
        artifacts.generator_meta(layout, 0, cfg=cfg)
    write_json(layout.ddpm(0) / "config.json", {"generator_id": "g0", "digest": artifacts.generator_digest(cfg)})
    assert artifacts.generator_meta(layout, 0, cfg=cfg)["generator_id"] == "g0"
    with pytest.raises(StageError, match="another data/cv/diffusion"):
        artifacts.generator_meta(layout, 0, cfg=smoke("diffusion.learning_rate=0.01"))
    assert artifacts.read_manifest(layout, 0, cfg=cfg) is None
    write_json(layout.synthetic(0) / "manifest.json", {"generator_id": "g0", "sampling_digest": "old",
                                                       "shards": [], "samples": []})
    with pytest.raises(StageError, match="another sampling config"):
        artifacts.read_manifest(layout, 0, cfg=cfg)
    write_json(layout.synthetic(0) / "manifest.json", {"generator_id": "g-older", "shards": [], "samples": [],
                                                       "sampling_digest": artifacts.sampling_digest(cfg)})
    with pytest.raises(StageError, match="older generator"):
        artifacts.read_manifest(layout, 0, cfg=cfg)


def test_the_privacy_gate_fails_library_callers_too():
    failed = {"privacy_passed": False, "gate": {"drop_memorised": False, "max_memorised_fraction": 0.01},
              "folds": [{"fold": 0, "gate": {"passed": False, "count": 9, "total": 20, "fraction": 0.45,
                                             "reference_fraction": 0.0}}]}
    with pytest.raises(PrivacyGateError, match="fold 0: 9/20"):
        enforce_privacy_gate(failed)
    enforce_privacy_gate({**failed, "privacy_passed": True})  # a passed gate is silent
