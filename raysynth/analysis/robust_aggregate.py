"""From the robustness stage's tables to the report's numbers: severity curves, paired tests per
severity, mean corruption error, the external test set, and calibration.

The rows have the shape of ``results.parquet`` rows (condition, real fraction, split, seed,
sizes and metric columns), plus ``corruption`` and ``severity`` for corrupted test parts, so the
study's own :func:`aggregate.summarise` and :func:`aggregate.compare` apply unchanged: seeds are
averaged within a split and every comparison with baseline is paired by split.

Mean corruption error follows ImageNet-C (Hendrycks & Dietterich 2019), with the error
``E = 1 - metric`` of a higher-is-better metric (the metric itself when lower is better), each
``E`` the mean over splits:

* ``CE(arm, c) = sum_s E(arm, c, s) / sum_s E(baseline, c, s)``, and ``mCE`` its mean over c;
* relative ``CE(arm, c) = sum_s [E(arm, c, s) - E(arm, clean)] / sum_s [E(baseline, c, s) - E(baseline, clean)]``:
  the degradation itself, whatever the clean error.

Baseline scores 1 on both by definition; below 1 is sturdier than baseline.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import numpy as np

from raysynth.analysis.aggregate import compare, fold_means, summarise
from raysynth.artifacts import fraction_key
from raysynth.design import BASELINE
from raysynth.downstream.metrics import (
    expected_calibration_error,
    nanmean,
    reliability_curve,
)

LOWER_IS_BETTER = frozenset({"mean_hd95", "ece"})
OVERALL = "all corruptions"


def _cells(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Rows by (corruption, severity): corruptions in their order of appearance (the config's),
    severities ascending."""
    out: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["corruption"], int(r["severity"]))].append(r)
    order = list(dict.fromkeys(c for c, _ in out))
    return {k: out[k] for k in sorted(out, key=lambda k: (order.index(k[0]), k[1]))}


def severity_curves(clean_rows: list[dict], corrupted_rows: list[dict], metrics: list[str]) -> dict:
    """``{corruption: {severity: summarise(...)}}`` with severity "0" the clean test part."""
    clean = summarise(clean_rows, metrics)
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (c, s), rows in _cells(corrupted_rows).items():
        out[c].setdefault("0", clean)
        out[c][str(s)] = summarise(rows, metrics)
    return dict(out)


def severity_tests(corrupted_rows: list[dict], metric: str) -> dict:
    """``{corruption: {severity: compare(...)}}``: each condition against baseline at each
    severity, paired by split, with the study's tests and Holm across conditions."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (c, s), rows in _cells(corrupted_rows).items():
        out[c][str(s)] = compare(rows, [metric])
    return dict(out)


def overall_rows(corrupted_rows: list[dict], metric: str) -> list[dict]:
    """One row per trial: ``metric`` averaged over every corruption and severity, for one paired
    test of overall robustness per condition."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    keys: dict[tuple, dict] = {}
    for r in corrupted_rows:
        k = (r["condition"], fraction_key(r["real_fraction"]), int(r["fold"]), int(r["seed"]))
        if r.get(metric) is not None and not math.isnan(float(r[metric])):
            acc[k].append(float(r[metric]))
        keys[k] = {f: r[f] for f in ("condition", "arm", "ratio", "real_fraction", "fold", "repeat", "seed",
                                     "n_real", "n_test")}
    return [{**keys[k], metric: float(np.mean(v))} for k, v in acc.items() if v]


def _error(value: float, metric: str) -> float:
    return value if metric in LOWER_IS_BETTER else 1.0 - value


def _mean_over_splits(rows: list[dict], metric: str) -> dict[str, dict[str, float]]:
    return {p: {c: float(np.mean(list(v.values()))) for c, v in by_c.items()}
            for p, by_c in fold_means(rows, metric).items()}


def corruption_errors(clean_rows: list[dict], corrupted_rows: list[dict], metric: str) -> dict:
    """``{fraction: {condition: {"ce", "mce", "relative_ce", "relative_mce"}}}`` (module docstring)."""
    clean = _mean_over_splits(clean_rows, metric)
    err: dict[str, dict[str, dict[str, dict[int, float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for (c, s), rows in _cells(corrupted_rows).items():
        for p, by_cond in _mean_over_splits(rows, metric).items():
            for cond, v in by_cond.items():
                err[p][cond][c][s] = _error(v, metric)
    out: dict[str, dict[str, dict]] = {}
    for p, by_cond in err.items():
        base = by_cond.get(BASELINE)
        if base is None or p not in clean or BASELINE not in clean[p]:
            continue
        base_clean = _error(clean[p][BASELINE], metric)
        block = out.setdefault(p, {})
        for cond, by_c in sorted(by_cond.items()):
            if cond not in clean[p]:
                continue
            own_clean = _error(clean[p][cond], metric)
            ce, rel = {}, {}
            for c in sorted(by_c):
                sev = sorted(set(by_c[c]) & set(base.get(c, {})))
                den = sum(base[c][s] for s in sev)
                ce[c] = sum(by_c[c][s] for s in sev) / den if sev and den > 0 else float("nan")
                rel_den = sum(base[c][s] - base_clean for s in sev)
                rel[c] = (sum(by_c[c][s] - own_clean for s in sev) / rel_den
                          if sev and rel_den > 1e-9 else float("nan"))
            block[cond] = {"ce": ce, "relative_ce": rel, "mce": nanmean(ce.values()),
                           "relative_mce": nanmean(rel.values()), "clean_error": own_clean}
    return out


def reliability(predictions: Optional[list[dict]], n_bins: int) -> dict:
    """Per fraction and condition, the top-label reliability curve of all predictions pooled over
    splits and seeds, with its ECE (``metrics.reliability_curve``)."""
    if not predictions:
        return {}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in predictions:
        groups[(fraction_key(r["real_fraction"]), r["condition"])].append(r)
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (p, c), rs in sorted(groups.items()):
        y = np.array([r["y_true"] for r in rs], dtype=np.int64)
        prob = np.array([r["y_prob"] for r in rs], dtype=np.float64)
        curve = reliability_curve(y, prob, n_bins)
        out[p][c] = {**{k: [None if isinstance(v, float) and math.isnan(v) else v for v in vals]
                        for k, vals in curve.items()},
                     "ece": expected_calibration_error(y, prob, n_bins), "n": len(rs)}
    return dict(out)


def robustness_section(clean_rows: list[dict], corrupted_rows: Optional[list[dict]],
                       external_rows: Optional[list[dict]], clean_predictions: Optional[list[dict]],
                       external_predictions: Optional[list[dict]], metrics: list[str], primary: str,
                       info: dict, n_bins: int) -> dict:
    """Everything the report shows about robustness, generalisation and calibration."""
    section: dict = {"primary": primary, "corruptions": info.get("corruptions", []),
                     "severities": info.get("severities", []), "external_source": info.get("external_source"),
                     "n_external": info.get("n_external"), "examples": info.get("examples"),
                     "external_examples": info.get("external_examples")}
    if corrupted_rows:
        overall = overall_rows(corrupted_rows, primary)
        section.update(
            curves=severity_curves(clean_rows, corrupted_rows, metrics),
            tests=severity_tests(corrupted_rows, primary),
            mce=corruption_errors(clean_rows, corrupted_rows, primary),
            overall={"summary": summarise(overall, [primary]), "comparisons": compare(overall, [primary])})
    if external_rows:
        section["external"] = {"summary": summarise(external_rows, metrics),
                               "comparisons": compare(external_rows, metrics)}
    calibration = {"clean": reliability(clean_predictions, n_bins),
                   "external": reliability(external_predictions, n_bins)}
    if any(calibration.values()):
        section["calibration"] = calibration
    return section
