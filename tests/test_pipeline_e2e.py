"""The smoke pipeline end to end on a real local Ray: every stage, its artifact, and the rules
that matter (no leakage, labels travel, idempotent stages, growable synthetic sets)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysynth.cli import main
from raysynth.config import load_config
from raysynth.data.schema import checksum, read_parquet
from raysynth.artifacts import Layout, read_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(ray_session, smoke_cli):
    """The session's smoke pipeline (conftest.smoke_cli: the CLI in a subprocess, whose console
    test_console checks); the reruns below go through ``main`` in this process, on the session's Ray."""
    assert smoke_cli.returncode == 0, smoke_cli.output[-3000:]
    return Layout.at(smoke_cli.out)


def test_every_stage_wrote_its_artifact(smoke_run):
    L = smoke_run
    for path in [L.data_parquet, L.fingerprint, L.splits, L.quality / "quality.json", L.study / "results.parquet",
                 L.robustness / "robustness.json", L.robustness / "corrupted.parquet", L.robustness / "external.parquet",
                 L.report / "report.json", L.report / "report.md", L.report / "real_vs_synthetic.png"]:
        assert path.is_file(), path
    folds = read_json(L.splits)["folds"]
    for f in folds:
        k = f["fold"]
        assert (L.ddpm(k) / "checkpoint" / "config.json").is_file()
        assert (L.ddpm(k) / "metrics.jsonl").read_text().strip()
        assert (L.synthetic(k) / "manifest.json").is_file()
        assert list(L.synthetic(k).glob("grid_*.png"))


def test_generators_never_saw_their_test_fold(smoke_run):
    L = smoke_run
    for f in read_json(L.splits)["folds"]:
        ids = read_json(L.ddpm(f["fold"]) / "train_ids.json")
        assert ids["train_ids"], "a generator must record what it trained on"
        assert not set(ids["train_ids"]) & set(f["test"])
        assert set(ids["train_ids"]) <= set(f["train"])


def test_synthetic_samples_carry_labels_and_provenance(smoke_run):
    L = smoke_run
    fp = read_json(L.fingerprint)
    for f in read_json(L.splits)["folds"]:
        k = f["fold"]
        manifest = read_json(L.synthetic(k) / "manifest.json")
        data = read_parquet([L.synthetic(k) / s for s in manifest["shards"]])
        assert len(data) == manifest["num_samples"] > 0
        assert set(data.labels.tolist()) == set(range(fp["num_classes"]))  # every class was generated
        assert sorted(manifest["counts"]) == sorted(fp["class_names"])
        assert set(data.subjects) == {"synthetic"}
        assert data.images.shape[1:] == tuple(fp["shape"])
        assert np.all(np.abs(data.images) <= 1.0)
        by_id = {s["id"]: s for s in manifest["samples"]}
        for i, sid in enumerate(data.ids):
            assert by_id[sid]["checksum"] == checksum(data.images[i]) == data.extra["checksum"][i]
        assert set(data.extra["generator_id"]) == {manifest["generator_id"]}
        assert len(set(data.extra["seed"])) == len(data)


def test_study_grid_and_report(smoke_run):
    L = smoke_run
    cfg = load_config("smoke")
    rows = pq.read_table(L.study / "results.parquet").to_pylist()
    folds = len(read_json(L.splits)["folds"])
    assert len(rows) == len(cfg.study.arms) * folds * len(cfg.study.seeds)
    assert {r["arm"] for r in rows} == set(cfg.study.arms)
    aug = [r for r in rows if r["arm"] == "synthetic"]
    base = [r for r in rows if r["arm"] == "baseline"]
    assert all(r["n_synthetic"] > 0 for r in aug) and all(r["n_synthetic"] == 0 for r in base)
    assert {r["condition"] for r in aug} == {f"synthetic x{cfg.sampling.ratio:g}"}
    # Same splits for every arm: the test sets of a (fold, seed) pair are identical.
    assert {(r["fold"], r["n_test"]) for r in aug} == {(r["fold"], r["n_test"]) for r in base}
    report = read_json(L.report / "report.json")
    assert list(report["comparisons"]) == ["1"]  # one real-data size: the whole training part
    comp = report["comparisons"]["1"][f"synthetic x{cfg.sampling.ratio:g}"]["balanced_accuracy"]
    assert comp["n"] == folds and "t_p" in comp and "wilcoxon_p" in comp and "nb_p" in comp
    assert report["packages"]["ray"].startswith("2.60")
    md = (L.report / "report.md").read_text()
    assert "Paired comparison against baseline" in md and "paired_differences.png" in md
    assert (L.report / "report.html").read_text().count("data:image/png;base64,") >= 5


def test_a_rerun_skips_finished_work(smoke_run, capsys):
    L = smoke_run
    watched = [L.data_parquet, L.ddpm(0) / "config.json", L.synthetic(0) / "manifest.json", L.study / "results.parquet"]
    before = {p: p.stat().st_mtime_ns for p in watched[:3]}
    assert main(["pipeline", "--preset", "smoke", "--out", str(L.root), "-q"]) == 0
    assert {p: p.stat().st_mtime_ns for p in watched[:3]} == before


def test_growing_the_synthetic_set_keeps_the_first_samples(smoke_run):
    L = smoke_run
    manifest = read_json(L.synthetic(0) / "manifest.json")
    first = {s["id"]: s["checksum"] for s in manifest["samples"]}
    shards_before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in L.synthetic(0).glob("part-*.parquet")}
    n = manifest["num_samples"]
    assert main(["sample", "--preset", "smoke", "--out", str(L.root), "--folds", "0", "--num-samples", str(n + 6), "-q"]) == 0
    grown = read_json(L.synthetic(0) / "manifest.json")
    assert grown["num_samples"] == n + 6
    now = {s["id"]: s["checksum"] for s in grown["samples"]}
    assert all(now[i] == c for i, c in first.items())  # the first N are untouched
    for name, digest in shards_before.items():  # and their files were not rewritten
        assert hashlib.sha256((L.synthetic(0) / name).read_bytes()).hexdigest() == digest
    # Shrinking back lists only the requested samples, without deleting work.
    assert main(["sample", "--preset", "smoke", "--out", str(L.root), "--folds", "0", "--num-samples", str(n), "-q"]) == 0
    assert read_json(L.synthetic(0) / "manifest.json")["num_samples"] == n


def test_any_sample_can_be_regenerated_from_the_manifest(smoke_run):
    from raysynth.diffusion.sampler import ShardSampler

    L = smoke_run
    cfg = load_config("smoke")
    manifest = read_json(L.synthetic(1) / "manifest.json")
    target = manifest["samples"][-1]
    assert manifest["config_digest"] and manifest["generator_id"]
    fold, label, index = 1, int(target["label"]), int(target["id"].rsplit("-", 1)[1])
    sampler = ShardSampler(cfg.to_dict(), str(L.root), fold, cpus=1)
    images, _ = sampler.generate(label, [index])
    stored = read_parquet([L.synthetic(1) / target["shard"]])
    i = stored.ids.index(target["id"])
    np.testing.assert_allclose(images[0], stored.images[i], atol=1e-4)
    assert json.dumps(target)  # the manifest row is plain JSON
