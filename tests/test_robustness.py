"""Robustness, generalisation and calibration: corrupted test parts, the external test set, the
statistics built on them, and the stage end to end on tiny data (no generators needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysynth.cli import main
from raysynth.config import ConfigError, load_config
from raysynth.data.external import BUILTIN, external_source, relabel
from raysynth.data.schema import ImageSet
from raysynth.errors import InputError
from raysynth.artifacts import Layout, read_json
from raysynth.downstream.augment import CORRUPTIONS, build_corruption
from raysynth.downstream.models import evaluate, fit_and_evaluate, load_network
from raysynth.analysis.robust_aggregate import corruption_errors, overall_rows, reliability, severity_tests
from raysynth.downstream.robust_eval import corrupt_test_part, corruption_seed


def _cfg(*overrides: str):
    return load_config("smoke", None, list(overrides))


# ---- config ----------------------------------------------------------------------------------------

def test_config_lists_every_corruption_and_validates():
    from raysynth.config import RobustnessConfig

    assert tuple(RobustnessConfig().corruptions) == CORRUPTIONS
    with pytest.raises(ConfigError, match="robustness.corruptions"):
        _cfg("robustness.corruptions=[noise, rain]")
    with pytest.raises(ConfigError, match="robustness.severities"):
        _cfg("robustness.severities=[0, 2]")
    with pytest.raises(ConfigError, match="robustness.severities"):
        _cfg("robustness.severities=[2, 2]")
    with pytest.raises(ConfigError, match=r"robustness.label_map.a"):
        _cfg("robustness.label_map={a: 1}")
    assert _cfg("robustness.label_map={tumour: lesion}").robustness.label_map == {"tumour": "lesion"}


def test_cli_external_test_sets_the_config(tmp_path, capsys):
    assert main(["config", "--preset", "smoke"]) == 0
    path = tmp_path / "ext #1"
    from raysynth.cli import build_parser, resolve_config

    args = build_parser().parse_args(["robustness", "--preset", "smoke", "--external-test", str(path)])
    assert resolve_config(args).robustness.external_test == str(path)


def test_external_source_defaults_to_the_builtin_cohort_only_for_embedded_data(tmp_path):
    assert external_source(_cfg()) == BUILTIN
    assert external_source(_cfg("robustness.builtin_external=false")) is None
    assert external_source(_cfg(f"data.source={tmp_path}")) is None
    assert external_source(_cfg(f"robustness.external_test={tmp_path}")) == str(tmp_path)


# ---- corrupted test parts ----------------------------------------------------------------------------

def test_channel_wise_corruptions_give_the_same_images_batched_and_one_by_one():
    x = np.random.default_rng(0).uniform(-1, 1, (6, 1, 16, 16)).astype(np.float32)
    for name in ("gibbs", "blur"):
        whole = build_corruption(name, 4, 0, 2)(x)
        single = np.stack([build_corruption(name, 4, 0, 2)(x[i : i + 1])[0] for i in range(len(x))])
        np.testing.assert_allclose(whole, single, atol=1e-5)


def test_corrupted_test_part_is_deterministic_and_shared_by_arms():
    cfg = _cfg("robustness.corruptions=[noise, spike, blur]", "robustness.severities=[1, 5]")
    x = np.random.default_rng(1).uniform(-1, 1, (5, 1, 16, 16)).astype(np.float32)
    a, b = corrupt_test_part(cfg, 0, x), corrupt_test_part(cfg, 0, x.copy())
    assert sorted(a) == [(c, s) for c in ("blur", "noise", "spike") for s in (1, 5)]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])  # every arm and seed of a split sees these images
        assert a[key].shape == x.shape and a[key].dtype == np.float32
        assert -1.0 <= a[key].min() and a[key].max() <= 1.0
    other = corrupt_test_part(cfg, 1, x)
    assert not np.array_equal(a[("noise", 1)], other[("noise", 1)])  # another split draws other noise
    # Severity grows the distance from the clean images.
    for c in ("noise", "spike", "blur"):
        assert np.abs(a[(c, 5)] - x).mean() > np.abs(a[(c, 1)] - x).mean()
    assert corruption_seed(0, 0, "noise", 1) < 2**32


# ---- external test set ----------------------------------------------------------------------------------

def _set(labels) -> ImageSet:
    n = len(labels)
    return ImageSet([f"e{i}" for i in range(n)], [f"s{i}" for i in range(n)], np.asarray(labels),
                    np.zeros((n, 1, 8, 8), np.float32))


def test_relabel_by_name_and_through_the_label_map():
    records = _set([0, 1, 1, 0])
    out = relabel(records, ["lesion", "healthy"], ["healthy", "lesion"], {}, "x")
    assert out.labels.tolist() == [1, 0, 0, 1]
    out = relabel(records, ["tumour", "normal"], ["healthy", "lesion"], {"tumour": "lesion", "normal": "healthy"}, "x")
    assert out.labels.tolist() == [1, 0, 0, 1]


def test_relabel_mismatch_is_a_clear_error():
    records = _set([0, 1])
    with pytest.raises(InputError, match=r"classes \['tumour'\] match no training class.*label_map"):
        relabel(records, ["healthy", "tumour"], ["healthy", "lesion"], {}, "x")
    with pytest.raises(InputError, match="not classes of the external"):
        relabel(records, ["healthy", "lesion"], ["healthy", "lesion"], {"glioma": "lesion"}, "x")
    with pytest.raises(InputError, match="not training classes"):
        relabel(records, ["healthy", "tumour"], ["healthy", "lesion"], {"tumour": "cancer"}, "x")


# ---- statistics ---------------------------------------------------------------------------------------

def _row(cond, fold, metric, **extra):
    return {"condition": cond, "arm": cond, "ratio": None, "real_fraction": 1.0, "fold": fold, "repeat": 0,
            "seed": 0, "n_real": 100, "n_test": 30, "balanced_accuracy": metric, **extra}


def test_mean_corruption_error_known_answer():
    # Baseline: clean 0.9 (error 0.1); noise severities 1, 2 -> 0.8, 0.6 (errors 0.2, 0.4).
    # Other arm: clean 0.95 (error 0.05); noise -> 0.9, 0.8 (errors 0.1, 0.2).
    clean = [_row("baseline", f, 0.9) for f in (0, 1)] + [_row("synthetic", f, 0.95) for f in (0, 1)]
    corrupted = [_row(c, f, v, corruption="noise", severity=s)
                 for f in (0, 1) for c, vals in (("baseline", (0.8, 0.6)), ("synthetic", (0.9, 0.8)))
                 for s, v in zip((1, 2), vals)]
    out = corruption_errors(clean, corrupted, "balanced_accuracy")["1"]
    assert out["baseline"]["mce"] == pytest.approx(1.0)
    assert out["synthetic"]["ce"]["noise"] == pytest.approx(0.3 / 0.6)
    # Relative: (0.05 + 0.15) / (0.1 + 0.3) = 0.5.
    assert out["synthetic"]["relative_mce"] == pytest.approx(0.2 / 0.4)
    assert out["synthetic"]["clean_error"] == pytest.approx(0.05)


def test_severity_tests_and_overall_rows_are_paired_by_split():
    rng = np.random.default_rng(0)
    corrupted = []
    for f in range(5):
        for s in (1, 3):
            base = 0.8 - 0.1 * s + rng.normal(0, 0.01)
            corrupted += [_row("baseline", f, base, corruption="blur", severity=s),
                          _row("synthetic", f, base + 0.05 + rng.normal(0, 0.002), corruption="blur", severity=s)]
    tests = severity_tests(corrupted, "balanced_accuracy")
    for s in ("1", "3"):
        r = tests["blur"][s]["1"]["synthetic"]["balanced_accuracy"]
        assert r["n"] == 5 and r["mean_diff"] == pytest.approx(0.05, abs=0.003)
        assert r["t_p"] < 1e-4  # a steady paired shift is detected, whatever the between-split spread
    overall = overall_rows(corrupted, "balanced_accuracy")
    assert len(overall) == 10
    first = next(r for r in overall if r["condition"] == "baseline" and r["fold"] == 0)
    expected = np.mean([r["balanced_accuracy"] for r in corrupted if r["condition"] == "baseline" and r["fold"] == 0])
    assert first["balanced_accuracy"] == pytest.approx(expected)


def test_reliability_pools_predictions_per_condition():
    preds = [{"real_fraction": 1.0, "condition": "baseline", "y_true": i % 2, "y_prob": [0.9, 0.1] if i % 2 else [0.1, 0.9]}
             for i in range(10)]
    out = reliability(preds, 5)
    cell = out["1"]["baseline"]
    assert cell["n"] == 10 and cell["ece"] == pytest.approx(0.9)  # confidently wrong everywhere
    assert sum(cell["count"]) == 10 and cell["confidence"][0] is None  # an empty bin is null in JSON


# ---- saved networks ----------------------------------------------------------------------------------

def _squares(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.normal(-0.5, 0.05, (n, 1, 16, 16)).astype(np.float32)
    images[labels == 1, :, 4:12, 4:12] += 1.0
    return ImageSet([f"r{i}" for i in range(n)], [f"s{i}" for i in range(n)], labels, np.clip(images, -1, 1))


def test_saved_network_scores_exactly_as_the_trained_one(tmp_path):
    train, test = _squares(24, 0), _squares(10, 1)
    path = tmp_path / "m.pt"
    r = fit_and_evaluate("classification", train, test, num_classes=2, num_mask_classes=None, epochs=3, batch_size=8,
                         learning_rate=1e-2, width=4, seed=0, save_to=path)
    model, spec = load_network(path)
    assert spec.task == "classification" and spec.num_outputs == 2 and spec.width == 4
    again = evaluate(model, "classification", test, num_classes=2, num_mask_classes=None, batch_size=4)
    np.testing.assert_allclose(np.array(again["y_prob"]), np.array(r["y_prob"]), atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        evaluate(model, "classification", test, num_classes=2, num_mask_classes=None, batch_size=4,
                 images=test.images[:, :, :8, :8])


# ---- the stage end to end ------------------------------------------------------------------------------

def _write_external(root: Path, names=("normal", "tumour"), per_class=4, size=20) -> None:
    """A class-folder external set whose classes are named differently from the cohort's."""
    rng = np.random.default_rng(5)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            img[4:16, 4:16] += 100 + 60 * c
            Image.fromarray(img).save(root / name / f"{i}.png")


@pytest.mark.slow
def test_robustness_stage_end_to_end_with_an_external_folder(ray_session, tmp_path):
    out, ext = tmp_path / "out", tmp_path / "external"
    _write_external(ext)
    common = ["--preset", "smoke", "--out", str(out), "-q", "--set", "study.arms=[baseline, classical]",
              "--set", "robustness.corruptions=[noise, blur]", "--set", "robustness.severities=[1, 4]"]
    for stage in ("prepare", "study"):
        assert main([stage, *common]) == 0
    # Names differ and no mapping is given: a clear error, nothing evaluated.
    assert main(["robustness", *common, "--external-test", str(ext)]) == 2
    mapping = ["--set", "robustness.label_map={normal: healthy, tumour: lesion}"]
    assert main(["robustness", *common, *mapping, "--external-test", str(ext)]) == 0
    layout = Layout.at(out)
    corrupted = pq.read_table(layout.robustness / "corrupted.parquet").to_pylist()
    assert len(corrupted) == 4 * 2 * 2  # (2 arms x 2 splits) x 2 corruptions x 2 severities
    assert {(r["corruption"], r["severity"]) for r in corrupted} == {("noise", 1), ("noise", 4), ("blur", 1), ("blur", 4)}
    external = pq.read_table(layout.robustness / "external.parquet").to_pylist()
    assert len(external) == 4 and all(r["n_external"] == 8 and r["n_test"] == 8 for r in external)
    preds = pq.read_table(layout.robustness / "external_predictions.parquet").to_pylist()
    assert len(preds) == 4 * 8 and all(p["id"].startswith("ext-") for p in preds)
    assert sorted({p["y_true"] for p in preds}) == [0, 1]
    info = read_json(layout.robustness / "robustness.json")
    assert info["external_source"] == str(ext) and info["n_external"] == 8 and info["splits"] == [0, 1]

    # A rerun is a no-op that keeps the results; the report gets the section and its figures.
    before = (layout.robustness / "splits" / "0.json").stat().st_mtime_ns
    assert main(["robustness", *common, *mapping, "--external-test", str(ext)]) == 0
    assert (layout.robustness / "splits" / "0.json").stat().st_mtime_ns == before
    assert main(["report", *common, *mapping, "--external-test", str(ext)]) == 0
    report = read_json(layout.report / "report.json")
    rb = report["robustness"]
    assert rb["primary"] == "balanced_accuracy" and set(rb["curves"]) == {"noise", "blur"}
    assert set(rb["curves"]["noise"]) == {"0", "1", "4"}
    assert rb["mce"]["1"]["baseline"]["mce"] == pytest.approx(1.0) or math.isnan(rb["mce"]["1"]["baseline"]["mce"])
    assert "classical" in rb["external"]["comparisons"]["1"]
    assert set(rb["calibration"]) == {"clean", "external"}
    for name in ("severity_curves.png", "mce.png", "external_vs_internal.png", "reliability_clean.png",
                 "reliability_external.png", "corruption_examples.png"):
        assert (layout.report / name).stat().st_size > 1000, name
    md = (layout.report / "report.md").read_text()
    assert "## Robustness, generalisation and calibration" in md and "External test set" in md
