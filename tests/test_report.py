"""The report stage on known study results: statistics, a self-contained HTML page, its Markdown
twin, and a rebuild from report.json alone that gives the same files."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysynth.config import load_config
from raysynth.artifacts import study_digest, write_json
from raysynth.stages.prepare import prepare
from raysynth.artifacts import Layout, read_json
from raysynth.stages.report import render_from_json, write_report

OVERRIDES = ["cv.folds=4", "study.arms=[baseline,classical,synthetic]", "study.real_fractions=[0.5,1.0]",
             "study.seeds=[0,1]"]
EFFECT = {"baseline": 0.0, "classical": 0.01, "synthetic x0.5": 0.08}


def _fake_study(cfg, layout: Layout) -> None:
    """results.parquet and predictions.parquet as the study stage writes them, with known effects:
    ``synthetic x0.5`` beats baseline by 0.08 in every split, ``classical`` by about nothing."""
    splits = read_json(layout.splits)["folds"]
    labels = dict(zip(*pq.read_table(layout.data_parquet, columns=["id", "label"]).to_pydict().values()))
    rng = np.random.default_rng(0)
    rows, preds = [], []
    for p in (1.0, 0.5):
        for s in splits:
            base = 0.7 + 0.1 * p + rng.normal(0, 0.02)
            for seed in (0, 1):
                for cond, arm, ratio in (("baseline", "baseline", None), ("classical", "classical", None),
                                         ("synthetic x0.5", "synthetic", 0.5)):
                    score = base + EFFECT[cond] + rng.normal(0, 0.01)
                    key = {"condition": cond, "arm": arm, "ratio": ratio, "real_fraction": p, "fold": s["fold"],
                           "repeat": 0, "seed": seed}
                    n_real = int(round(p * len(s["train"])))
                    rows.append({**key, "n_real": n_real, "n_synthetic": 5 if ratio else 0, "n_test": len(s["test"]),
                                 "seconds": 1.0, "accuracy": score, "balanced_accuracy": score, "sensitivity": score,
                                 "specificity": score, "auc": min(1.0, score + 0.1), "metrics_json": "{}"})
                    for rid in s["test"]:
                        y = int(labels[rid])
                        right = rng.random() < score
                        p1 = rng.uniform(0.6, 1.0) if (y == 1) == right else rng.uniform(0.0, 0.4)
                        preds.append({**key, "id": rid, "y_true": y, "y_prob": [1 - p1, p1]})
    layout.study.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), layout.study / "results.parquet")
    pq.write_table(pa.Table.from_pylist(preds), layout.study / "predictions.parquet")
    write_json(layout.study / "study.json", {"digest": study_digest(cfg)})  # what marks them current


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cfg = load_config("smoke", None, OVERRIDES)
    layout = Layout.at(root)
    prepare(cfg, layout)
    _fake_study(cfg, layout)
    report = write_report(cfg, layout)
    return cfg, layout, report


def test_statistics_follow_the_design(reported):
    _, layout, report = reported
    assert set(report["summary"]) == {"1", "0.5"}
    for p in ("1", "0.5"):
        comp = report["comparisons"][p]
        assert set(comp) == {"classical", "synthetic x0.5"}
        syn = comp["synthetic x0.5"]["balanced_accuracy"]
        assert syn["n"] == 4  # paired by split: seeds averaged, not counted as replicates
        assert syn["mean_diff"] == pytest.approx(0.08, abs=0.02)
        assert syn["boot_ci_low"] < syn["mean_diff"] < syn["boot_ci_high"]
        assert syn["nb_p"] >= syn["t_p"]  # the correction only ever widens
        for test in ("t_p", "nb_p", "wilcoxon_p"):
            for c in comp.values():
                assert c["balanced_accuracy"][f"{test}_holm"] >= c["balanced_accuracy"][test]
        cell = report["summary"][p]["baseline"]["balanced_accuracy"]
        assert cell["nb_ci_high"] - cell["nb_ci_low"] > cell["ci_high"] - cell["ci_low"] > 0
        assert cell["n_splits"] == 4 and cell["n_trials"] == 8
    assert report["summary"]["1"]["baseline"]["balanced_accuracy"]["mean"] > \
        report["summary"]["0.5"]["baseline"]["balanced_accuracy"]["mean"]
    # ROC and confusion come from predictions.parquet: every test record once per split and seed.
    n_test = sum(len(s["test"]) for s in read_json(layout.splits)["folds"])
    conf = np.array(report["confusion"]["1"]["baseline"])
    assert conf.shape == (2, 2) and conf.sum() == 2 * n_test
    roc = report["roc"]["curves"]["1"]["synthetic x0.5"]
    assert len(roc["tpr"]) == len(report["roc"]["fpr"]) and 0.5 < roc["auc_pooled"] <= 1.0


def test_html_is_self_contained(reported):
    _, layout, _ = reported
    html = (layout.report / "report.html").read_text()
    refs = re.findall(r'\b(?:src|href|action|data)\s*=\s*"([^"]*)"', html, flags=re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert not re.search(r"<(script|link|iframe|object|embed)\b", html, flags=re.I)
    assert "url(" not in html and "@import" not in html
    for name in ("learning_curve_balanced_accuracy.png", "learning_curve_auc.png", "paired_differences.png",
                 "roc.png", "confusion.png", "real_vs_synthetic.png"):
        assert (layout.report / name).is_file()
    assert html.count("<img ") == len(re.findall(r"!\[", (layout.report / "report.md").read_text()))


def test_markdown_twin_says_the_same(reported):
    _, layout, report = reported
    md = (layout.report / "report.md").read_text()
    html = (layout.report / "report.html").read_text()
    md_headings = re.findall(r"^#+ (.+)$", md, flags=re.M)
    html_headings = [re.sub(r"&#x27;", "'", h) for h in re.findall(r"<h\d>(.*?)</h\d>", html)]
    assert md_headings == html_headings
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (layout.report / name).is_file()
    for section in ("Findings", "Methods", "Paired comparison against baseline", "ROC curves and confusion matrices",
                    "Reproducibility"):
        assert section in md_headings
    # The methods text comes from the config and names the primary test and why.
    assert "4-fold cross-validation" in md and "50% (mean" in md and "ratios r: 0.5" in md
    assert "Primary test: the Nadeau-Bengio corrected resampled t-test, because" in md
    findings = dict(re.findall(r"^- Real data 100%, ([^:]+): .*\): (.*)$", md, flags=re.M))
    assert findings == {"classical": "not significant after Holm correction at 0.05.",
                        "synthetic x0.5": "significant after Holm correction at 0.05."}
    assert report["packages"]["scipy"] in md


def test_rebuild_from_report_json_gives_the_same_files(reported, tmp_path):
    _, layout, _ = reported
    render_from_json(layout.report / "report.json", tmp_path)
    for name in ["report.html", "report.md", *[p.name for p in layout.report.glob("*.png")]]:
        assert (tmp_path / name).read_bytes() == (layout.report / name).read_bytes(), name


def test_report_command_renders_from_report_json_alone(reported, tmp_path):
    cfg, layout, _ = reported
    import shutil

    copy = Layout.at(tmp_path / "copy")
    shutil.copytree(layout.prepared, copy.prepared)
    shutil.copytree(layout.report, copy.report)
    before = (copy.report / "report.html").read_bytes()
    (copy.report / "report.html").unlink()
    write_report(cfg, copy)  # no study results here: report.json is the only source
    assert (copy.report / "report.html").read_bytes() == before


def test_changed_results_rebuild_report_json(reported, tmp_path):
    cfg, layout, report = reported
    import shutil

    copy = Layout.at(tmp_path / "changed")
    for folder in (layout.prepared, layout.study, layout.report):
        shutil.copytree(folder, copy.root / folder.name)
    table = pq.read_table(copy.study / "results.parquet").to_pylist()
    table = [r for r in table if r["seed"] == 0]
    pq.write_table(pa.Table.from_pylist(table), copy.study / "results.parquet")
    rebuilt = write_report(cfg, copy)
    assert rebuilt["results_sha256"] != report["results_sha256"]
    assert rebuilt["summary"]["1"]["baseline"]["balanced_accuracy"]["n_trials"] == 4


def test_report_json_is_strict_json(reported):
    """NaN and Infinity are not JSON: jq and a browser's JSON.parse reject them."""
    _, layout, _ = reported

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    for path in [layout.report / "report.json", layout.fingerprint, layout.splits]:
        json.loads(path.read_text(), parse_constant=refuse)


def test_a_report_whose_numbers_are_null_still_renders(reported, tmp_path):
    """report.json stores NaN as null (a test that could not run, a metric with no defined value);
    every page, summary line and figure must read those as 'n/a', not fail on them."""
    from raysynth.render.report import summary_lines

    _, layout, _ = reported
    report = read_json(layout.report / "report.json")

    def blank(node):
        if isinstance(node, dict):
            return {k: (None if isinstance(v, float) and k != "threshold" else blank(v)) for k, v in node.items()}
        return [blank(v) for v in node] if isinstance(node, list) else node

    report["comparisons"] = blank(report["comparisons"])
    for p in report["summary"]:
        for c in report["summary"][p]:
            report["summary"][p][c] = {m: {**s, "mean": None, "sd": None, "nb_ci_low": None, "nb_ci_high": None}
                                       for m, s in report["summary"][p][c].items()}
    path = tmp_path / "nulls.json"
    path.write_text(json.dumps(report))
    render_from_json(path, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "no test possible" in md and "n/a" in md
    assert any("n/a" in line for line in summary_lines(report))


def _comparison(low, high, diff=0.05):
    return {"balanced_accuracy": {"mean_diff": diff, "nb_ci_low": low, "nb_ci_high": high, "n": 4}}


@pytest.mark.parametrize(
    "comparisons, expected",
    [
        ({"classical": _comparison(0.01, 0.2), "synthetic x1": _comparison(-0.1, 0.2)}, "Not shown: the corrected 95% CI of 1 of 1"),
        ({"synthetic x1": _comparison(0.01, 0.2), "synthetic x2": _comparison(-0.1, 0.2)}, "It helps: 1 of 2 synthetic conditions has"),
        ({"synthetic x1": _comparison(-0.3, -0.01, -0.1)}, "It hurts: 1 of 1 synthetic condition has"),
        ({"synthetic x1": _comparison(None, None)}, "Unknown: none of the 1 synthetic condition"),
    ],
)
def test_the_summary_answers_the_question_from_the_intervals(comparisons, expected):
    from raysynth.render.document import answer

    report = {"primary_metric": "balanced_accuracy", "metrics": ["balanced_accuracy"], "task": "classification",
              "comparisons": {"1": comparisons}, "quality": None}
    lines = answer(report)
    assert len(lines) == 1 and lines[0].startswith("Does synthetic data help at 100% real data? " + expected), lines
