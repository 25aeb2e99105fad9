"""``raysynth status OUT``: small fake outputs written the way the stages write them (no pipeline run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from raysynth import artifacts as art
from raysynth.artifacts import Layout, write_json
from raysynth.cli import main
from raysynth.config import load_config
from raysynth.data.splits import make_splits
from raysynth.design import conditions, scarcity_subsets
from raysynth.io import write_table
from raysynth.stages.robustness import robustness_digest
from raysynth.status import STAGES, collect, open_output, render

CLASSES = ["healthy", "lesion"]
FD = {0: (3.0, 2.0), 1: (5.0, 4.0)}  # fold: (synthetic FD, real-vs-real FD)


@pytest.fixture(scope="module")
def cfg():
    return load_config("smoke")


def write_prepared(layout: Layout, cfg) -> list[dict]:
    ids = [f"r{i:03d}" for i in range(12)]
    labels, subjects = [i % 2 for i in range(12)], [f"s{i}" for i in range(12)]
    folds = make_splits(labels, subjects, cfg.cv.folds, cfg.cv.repeats, cfg.cv.seed, ids=ids)
    write_table(pa.table({"id": ids, "label": labels}), layout.data_parquet)
    write_json(layout.splits, {"folds": folds, "seed": cfg.cv.seed, "n_folds": cfg.cv.folds, "repeats": cfg.cv.repeats})
    write_json(layout.subsets, scarcity_subsets(cfg, folds, dict(zip(ids, labels)), dict(zip(ids, subjects))))
    write_json(layout.fingerprint, {"config_digest": art.prepared_digest(cfg), "source_signature": None,
                                    "num_records": 12, "class_names": CLASSES, "num_classes": 2})
    return folds


def write_generator(layout: Layout, cfg, fold: int) -> None:
    out = layout.ddpm(fold)
    write_json(out / art.CHECKPOINT_DIR / "config.json", {})  # what save_pretrained writes, beside the weights
    write_json(out / art.TRAIN_IDS, {"fold": fold, "train_ids": []})
    write_json(out / art.GENERATOR_META, {"generator_id": f"ddpm-fold{fold}-{art.generator_digest(cfg)}", "fold": fold,
                                          "fraction": 1.0, "digest": art.generator_digest(cfg)})


def write_shard(layout: Layout, fold: int, label: int) -> str:
    name = art.shard_name(label, 0, 2)
    write_table(pa.table({"id": [art.sample_id(fold, label, j) for j in range(2)]}), layout.synthetic(fold) / name)
    return name


def write_synthetic(layout: Layout, cfg, fold: int) -> None:
    shards = [write_shard(layout, fold, c) for c in range(2)]
    write_json(layout.synthetic(fold) / art.MANIFEST, {
        "fold": fold, "fraction": 1.0, "generator_id": f"ddpm-fold{fold}-{art.generator_digest(cfg)}",
        "sampling_digest": art.sampling_digest(cfg), "counts": dict.fromkeys(CLASSES, 2), "num_samples": 4,
        "shards": shards, "samples": []})


def write_quality(layout: Layout, cfg, folds: list[int], verdict: str = "passed") -> None:
    reports = []
    for k in folds:
        (layout.quality / f"nearest_pairs_fold{k}.png").parent.mkdir(parents=True, exist_ok=True)
        (layout.quality / f"nearest_pairs_fold{k}.png").write_bytes(b"png")
        reports.append({"fold": k, "figures": {"nearest_pairs": f"nearest_pairs_fold{k}.png"},
                        "gate": {"passed": verdict == "passed", "count": 0, "total": 4},
                        "metrics": {"overall": {"synthetic_matched": {"fd": FD[k][0]}, "reference": {"fd": FD[k][1]}}}})
    (layout.quality / art.NCC_HISTOGRAM).write_bytes(b"png")
    write_json(layout.quality / art.QUALITY_JSON, {
        "version": art.QUALITY_VERSION, "config_digest": art.quality_digest(cfg), "seed": cfg.seed,
        "privacy_passed": verdict == "passed", "privacy_verdict": verdict, "folds": reports})


def write_trial(layout: Layout, cfg, condition, fold: int, value: float) -> None:
    key = art.trial_key(condition.arm, condition.ratio, 1.0, fold, 0)
    write_json(layout.study_trials / f"{key}.json", {
        "arm": condition.arm, "ratio": condition.ratio, "fraction": 1.0, "fold": fold, "seed": 0,
        "condition": condition.name, "metrics": {"balanced_accuracy": value, "auc": value}, "n_real": 6,
        "n_synthetic": 3, "n_test": 6, "seconds": 1.0, "digest": art.study_digest(cfg)})


def write_study(layout: Layout, cfg, folds: list[int]) -> None:
    rows = []
    for c in conditions(cfg):
        for k in folds:
            value = 0.7 + 0.05 * (c.arm != "baseline") + 0.01 * k
            write_trial(layout, cfg, c, k, value)
            rows.append({"condition": c.name, "real_fraction": 1.0, "fold": k, "balanced_accuracy": value})
    write_table(pa.Table.from_pylist(rows), layout.study / art.RESULTS)
    write_json(layout.study / art.STUDY_JSON, {"digest": art.study_digest(cfg), "num_trials": len(rows)})


def write_robustness(layout: Layout, cfg, folds: list[int], gather: bool = True) -> None:
    digest = robustness_digest(cfg)  # the stage's own digest: status must agree with it
    for k in folds:
        write_json(layout.robustness / "splits" / f"{k}.json", {"fold": k, "digest": digest})
    if gather:
        write_json(layout.robustness / art.ROBUSTNESS_JSON, {"digest": digest, "splits": folds})


def write_report(layout: Layout) -> None:
    summary = {"1": {"baseline": {"balanced_accuracy": {"mean": 0.705, "n_splits": 2}},
                     "synthetic x0.5": {"balanced_accuracy": {"mean": 0.755, "n_splits": 2}}}}
    write_json(layout.report / art.REPORT_JSON, {"primary_metric": "balanced_accuracy", "metrics": ["balanced_accuracy"],
                                                 "summary": summary, "results_sha256": art.report_inputs_sha256(layout)})
    (layout.report / "report.html").write_text("<html></html>")


def complete_output(root: Path, cfg) -> Layout:
    layout = Layout.at(root)
    folds = [f["fold"] for f in write_prepared(layout, cfg)]
    for k in folds:
        write_generator(layout, cfg, k)
        write_synthetic(layout, cfg, k)
    write_quality(layout, cfg, folds)
    write_study(layout, cfg, folds)
    write_robustness(layout, cfg, folds)
    write_report(layout)
    return layout


def states(status: dict) -> dict[str, str]:
    return {s["stage"]: s["state"] for s in status["stages"]}


def by_stage(status: dict) -> dict[str, dict]:
    return {s["stage"]: s for s in status["stages"]}


def test_the_stages_are_the_pipelines():
    from raysynth.pipeline import STAGES as PIPELINE_STAGES

    assert STAGES == PIPELINE_STAGES


def test_a_complete_output_and_its_figures(tmp_path, cfg):
    layout = complete_output(tmp_path / "run", cfg)
    status = collect(layout, cfg)
    assert set(states(status).values()) == {"complete", "unused"}
    assert by_stage(status)["train"]["detail"] == "2 of 2 folds trained"
    f = status["figures"]
    assert f["primary_metric"] == "balanced_accuracy" and f["source"] == "report.json"
    assert [(a["condition"], a["mean"]) for a in f["arms"]] == [("baseline", 0.705), ("synthetic x0.5", 0.755)]
    assert f["privacy"] == {"verdict": "passed", "passed": True, "current": True}
    assert [q["fd_ratio"] for q in f["quality"]] == [1.5, 1.25]
    assert status["report_html"] == str(layout.report / "report.html")
    text = "\n".join(render(status))
    assert "privacy gate: passed" in text and "fold 0 3 / 2 = 1.50" in text and "synthetic x0.5: 0.755" in text
    assert f"report: {layout.report / 'report.html'}" in text and "stale" not in text


def test_a_partly_done_output(tmp_path, cfg):
    layout = Layout.at(tmp_path / "run")
    write_prepared(layout, cfg)
    write_generator(layout, cfg, 0)
    write_synthetic(layout, cfg, 0)
    write_shard(layout, 1, 0)  # fold 1's sampling was interrupted: a shard, no manifest
    write_quality(layout, cfg, [0])
    base, synthetic = conditions(cfg)
    write_trial(layout, cfg, base, 0, 0.6)
    write_trial(layout, cfg, synthetic, 0, 0.8)
    write_robustness(layout, cfg, [0], gather=False)
    status = collect(layout, cfg)
    stage = by_stage(status)
    assert states(status) == {"prepare": "complete", "autoencoder": "unused", "train": "partial", "sample": "partial", "quality": "complete",
                              "study": "partial", "robustness": "partial", "report": "missing"}
    assert stage["train"]["detail"] == "1 of 2 folds trained"
    assert stage["sample"]["detail"] == "1 of 2 folds sampled; in progress: fold 1"
    assert stage["study"]["detail"] == "2 of 4 trials done" and (stage["study"]["done"], stage["study"]["total"]) == (2, 4)
    assert stage["robustness"]["detail"] == "1 of 2 splits evaluated"
    f = status["figures"]  # no report yet: the figures so far come from the finished trials
    assert f["source"] == "2 finished study trials"
    assert [(a["condition"], a["mean"], a["n_splits"]) for a in f["arms"]] == [("baseline", 0.6, 1), ("synthetic x0.5", 0.8, 1)]
    assert status["report_html"] is None and render(status)[-1] == "report: not written yet"


def test_stale_stages_against_another_config(tmp_path, cfg):
    layout = complete_output(tmp_path / "run", cfg)
    other = load_config("smoke", overrides=["sampling.steps=6"])  # the samples change; data and generators do not
    status = collect(layout, other)
    assert states(status) == {"prepare": "complete", "autoencoder": "unused", "train": "complete", "sample": "stale", "quality": "stale",
                              "study": "stale", "robustness": "stale", "report": "stale"}
    assert by_stage(status)["sample"]["detail"] == "0 of 2 folds sampled; stale: fold 0, fold 1"
    assert status["figures"]["privacy"]["current"] is False and status["figures"]["source"] == "report.json, stale"
    text = render(status)
    assert "privacy gate: passed (stale)" in text and not any("every artifact is stale" in line for line in text)
    moved = collect(layout, load_config("smoke", overrides=["cv.seed=7"]))  # other splits: nothing is current
    assert {s for s in states(moved).values()} == {"stale", "unused"}
    assert any("every artifact is stale for this config" in line for line in render(moved))


def test_missing_stages(tmp_path, cfg):
    layout = Layout.at(tmp_path / "run")
    write_prepared(layout, cfg)
    status = collect(layout, cfg)
    assert states(status) == {"prepare": "complete", **dict.fromkeys(STAGES[1:], "missing"), "autoencoder": "unused"}
    assert status["figures"]["arms"] == [] and status["figures"]["privacy"] is None
    assert layout.fingerprint.unlink() is None and states(collect(layout, cfg))["prepare"] == "partial"


def test_cli_prints_text_and_strict_json(tmp_path, cfg, capsys):
    layout = complete_output(tmp_path / "run", cfg)
    write_quality(layout, cfg, [0, 1], verdict="inconclusive")
    assert main(["status", str(layout.root), "--preset", "smoke"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{layout.root}, against config {cfg.digest()}:") and "privacy gate: inconclusive" in out
    assert main(["status", str(layout.root), "--preset", "smoke", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert parsed["figures"]["privacy"]["verdict"] == "inconclusive" and parsed["stages"][0]["stage"] == "prepare"


@pytest.mark.parametrize("make", ["missing", "empty", "other files"])
def test_not_an_output_is_one_line_naming_the_path(tmp_path, capsys, make):
    path = tmp_path / "elsewhere"
    if make != "missing":
        path.mkdir()
    if make == "other files":
        (path / "notes.txt").write_text("hello")
        (path / "data").mkdir()
    assert main(["status", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("raysynth: error: ") and str(path) in captured.err and "not a raysynth output" in captured.err


def test_a_uri_output_is_read_through_its_staging_folder(tmp_path, cfg, monkeypatch, capsys):
    bucket = complete_output(tmp_path / "bucket" / "run1", cfg).root
    monkeypatch.setenv("RAYSYNTH_STAGING", str(tmp_path / "staging"))
    uri = f"file://{bucket}"
    layout = open_output(uri)  # pulled into the staging folder, as before a stage
    assert layout.remote == uri and layout.root.parent == tmp_path / "staging" and layout.fingerprint.is_file()
    assert set(states(collect(layout, cfg)).values()) == {"complete", "unused"}
    assert main(["status", uri, "--preset", "smoke"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{uri} (staged in {layout.root})") and f"report: {layout.report / 'report.html'}" in out
    assert main(["status", f"file://{tmp_path / 'no-such-bucket'}"]) == 2
    assert "no-such-bucket is not a raysynth output" in capsys.readouterr().err


def test_status_starts_no_ray(tmp_path, cfg, monkeypatch, capsys):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("raysynth status started Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    layout = complete_output(tmp_path / "run", cfg)
    # ray.init raising proves the in-process call never starts Ray (the test session may share one)
    assert main(["status", str(layout.root), "--preset", "smoke"]) == 0
    capsys.readouterr()
    script = ("import sys; from raysynth.cli import main; code = main(sys.argv[1:]); "
              "assert 'ray' not in sys.modules, 'status imported ray'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "status", str(layout.root), "--preset", "smoke"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "report:" in done.stdout
