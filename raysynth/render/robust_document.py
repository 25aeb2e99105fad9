"""The report's robustness, generalisation and calibration section, built from report.json alone."""

from __future__ import annotations

import math

from raysynth.render.html import Block, Bullets, Figure, Heading, Paragraph, Table
from raysynth.render.text import ALPHA, fmt, num, pct


def _verdict(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "no test possible"
    return "significant after Holm" if p < ALPHA else "not significant after Holm"


def how_to_read(rb: dict) -> list[str]:
    sev = ", ".join(str(s) for s in rb["severities"])
    return [
        f"Every trained network of the study is scored, without retraining, on its split's real test part corrupted "
        f"with {', '.join(rb['corruptions'])} at severities {sev} (MONAI transforms; the schedules are in "
        "raysynth.downstream.augment). The corruption draws depend only on the split, corruption and severity, so every "
        "condition and seed sees the same corrupted images and the comparisons stay paired by split.",
        f"Severity curves: {rb['primary']} against severity (0 is the clean test part). A flatter curve is a sturdier "
        "model; curves that start apart and run parallel differ in accuracy, not robustness.",
        "Mean corruption error (mCE, in the spirit of ImageNet-C): the error (1 - metric) summed over severities, "
        "divided by baseline's, then averaged over corruptions. Baseline is 1; below 1 is sturdier. Relative mCE "
        "uses the drop from each model's own clean error instead, so it measures the degradation alone: a model "
        "that is better everywhere but degrades as fast has mCE below 1 and relative mCE near 1.",
        "Paired tests at each severity use the study's statistics (Nadeau-Bengio corrected t-test, Holm across "
        "conditions at one real-data size and severity; the paired t-test beside it). 'All corruptions' averages the "
        "metric over every corruption and severity per trial: one test of overall robustness per condition.",
    ]


def _mce_table(rb: dict) -> Table:
    corruptions = rb["corruptions"]
    rows = []
    for p in sorted(rb["mce"], key=float, reverse=True):
        for c, r in rb["mce"][p].items():
            rows.append((pct(p), c, fmt(r["mce"]), fmt(r["relative_mce"]), fmt(r["clean_error"]),
                         *[fmt(r["ce"].get(k)) for k in corruptions]))
    return Table(("real data", "condition", "mCE", "relative mCE", "clean error", *[f"CE {k}" for k in corruptions]),
                 tuple(rows), f"error = 1 - {rb['primary']}; baseline = 1 by definition")


def _comparison_rows(block: dict, metric: str, prefix: tuple) -> list[tuple]:
    rows = []
    for p in sorted(block, key=float, reverse=True):
        for c, by_metric in block[p].items():
            r = by_metric.get(metric, {})
            if "mean_diff" not in r:
                continue
            rows.append((*prefix, pct(p), c, str(r["n"]), f"{num(r['mean_diff'], '+.3f')}",
                         f"[{fmt(r['nb_ci_low'])}, {fmt(r['nb_ci_high'])}]", fmt(r.get("nb_p")),
                         fmt(r.get("nb_p_holm")), fmt(r.get("t_p"))))
    return rows


_TEST_HEAD = ("real data", "condition", "splits", "mean diff", "corrected 95% CI", "corrected p", "corrected p (Holm)",
              "paired t p")


def findings(rb: dict) -> list[str]:
    """One sentence per condition and size on overall robustness, and on the external set."""
    m, out = rb["primary"], []
    comps = rb.get("overall", {}).get("comparisons", {})
    for p in sorted(comps, key=float, reverse=True):
        for c, by_metric in comps[p].items():
            r = by_metric.get(m, {})
            if "mean_diff" in r:
                mce = rb.get("mce", {}).get(p, {}).get(c, {})
                out.append(f"Corrupted test parts, real data {pct(p)}, {c}: {m} averaged over all corruptions "
                           f"{num(r['mean_b'], '.3f')} against baseline {num(r['mean_a'], '.3f')} ({num(r['mean_diff'], '+.3f')}, corrected "
                           f"95% CI {fmt(r['nb_ci_low'])} to {fmt(r['nb_ci_high'])}, Holm p = "
                           f"{fmt(r.get('nb_p_holm'))}: {_verdict(r.get('nb_p_holm'))}); mCE {fmt(mce.get('mce'))}, "
                           f"relative mCE {fmt(mce.get('relative_mce'))}.")
    ext = rb.get("external", {}).get("comparisons", {})
    for p in sorted(ext, key=float, reverse=True):
        for c, by_metric in ext[p].items():
            r = by_metric.get(m, {})
            if "mean_diff" in r:
                out.append(f"External test set, real data {pct(p)}, {c}: {m} {num(r['mean_b'], '.3f')} against baseline "
                           f"{num(r['mean_a'], '.3f')} ({num(r['mean_diff'], '+.3f')}, corrected 95% CI {fmt(r['nb_ci_low'])} to "
                           f"{fmt(r['nb_ci_high'])}, Holm p = {fmt(r.get('nb_p_holm'))}: "
                           f"{_verdict(r.get('nb_p_holm'))}).")
    return out


def _external_table(rb: dict, metrics: list[str]) -> Table:
    rows = []
    summary = rb["external"]["summary"]
    for p in sorted(summary, key=float, reverse=True):
        for c, cell in summary[p].items():
            rows.append((pct(p), c, *[f"{fmt(cell[m]['mean'])} [{fmt(cell[m]['nb_ci_low'])}, "
                                       f"{fmt(cell[m]['nb_ci_high'])}]" if m in cell else "n/a" for m in metrics]))
    return Table(("real data", "condition", *metrics), tuple(rows),
                 "external test set: mean over splits (seed-averaged) [corrected 95% CI]")


def _calibration_table(rb: dict) -> Table:
    cal = rb["calibration"]
    clean_summary = next(iter(rb["curves"].values()))["0"] if rb.get("curves") else {}
    ext_summary = rb.get("external", {}).get("summary", {})
    rows = []
    for p in sorted(set(cal.get("clean", {})) | set(cal.get("external", {})), key=float, reverse=True):
        for c in sorted(set(cal.get("clean", {}).get(p, {})) | set(cal.get("external", {}).get(p, {}))):
            per_split = [(s.get(p, {}).get(c, {}).get("ece") or {}).get("mean") for s in (clean_summary, ext_summary)]
            pooled = [cal.get(w, {}).get(p, {}).get(c, {}).get("ece") for w in ("clean", "external")]
            rows.append((pct(p), c, fmt(per_split[0]), fmt(pooled[0]), fmt(per_split[1]), fmt(pooled[1])))
    return Table(("real data", "condition", "ECE internal (mean over splits)", "ECE internal (pooled)",
                  "ECE external (mean over splits)", "ECE external (pooled)"), tuple(rows),
                 "expected calibration error, equal-width top-label confidence bins; lower is better")


def robustness_blocks(report: dict, figures: set[str]) -> list[Block]:
    """The section's blocks; empty when the robustness stage has not run."""
    rb = report.get("robustness")
    if not rb:
        return []
    fig = lambda name, caption: [Figure(name, caption)] if name in figures else []  # noqa: E731
    m = rb["primary"]
    blocks: list[Block] = [Heading(2, "Robustness, generalisation and calibration")]
    found = findings(rb)
    if found:
        blocks.append(Bullets(tuple(found)))
    if rb.get("curves"):
        blocks += [Heading(3, "Corrupted test parts"), *[Paragraph(t) for t in how_to_read(rb)],
                   *fig("corruption_examples.png", "one real test image under every corruption and severity"),
                   *fig("severity_curves.png", f"{m} against severity per corruption and condition")]
    if rb.get("mce"):
        blocks += [_mce_table(rb), *fig("mce.png", "mean corruption error relative to baseline")]
    overall = rb.get("overall", {}).get("comparisons", {})
    if overall:
        blocks.append(Table(_TEST_HEAD, tuple(_comparison_rows(overall, m, ())),
                            f"{m} averaged over all corruptions and severities, condition minus baseline, paired by split"))
    if rb.get("tests"):
        rows = [row for c, by_s in rb["tests"].items() for s, block in sorted(by_s.items(), key=lambda kv: int(kv[0]))
                for row in _comparison_rows(block, m, (c, s))]
        blocks.append(Table(("corruption", "severity", *_TEST_HEAD), tuple(rows),
                            f"{m} at each corruption and severity, condition minus baseline, paired by split"))
    if rb.get("external"):
        blocks += [Heading(3, "External test set"),
                   Paragraph(f"Source: {rb['external_source']} ({rb.get('n_external')} records), preprocessed like the "
                             "main data and never seen by a generator or used for model selection. Every network of "
                             "the study is scored on the whole set; the comparisons are paired by split as above. The set is "
                             "the same for every split, so its intervals show the variation of training, not the "
                             "sampling of the external scans themselves (nor of sites: it is one other site). In "
                             "the scatter, a point below the diagonal loses performance off-site; a condition that "
                             "generalises better sits higher at the same internal score."),
                   _external_table(rb, [k for k in report["metrics"]]),
                   Table(_TEST_HEAD, tuple(_comparison_rows(rb["external"]["comparisons"], m, ())),
                         f"external test set: {m}, condition minus baseline, paired by split"),
                   *fig("external_vs_internal.png", f"{m}: internal test parts against the external test set"),
                   *fig("external_examples.png", "external test images")]
    if rb.get("calibration"):
        blocks += [Heading(3, "Calibration"),
                   Paragraph("Expected calibration error (ECE) is the gap between confidence and accuracy, weighted "
                             "over confidence bins (Guo et al. 2017). In a reliability diagram a well-calibrated model "
                             "follows the diagonal; below it is over-confident. Pooled values use every prediction of "
                             "every split and seed at once."),
                   _calibration_table(rb),
                   *fig("reliability_clean.png", "reliability diagrams on the real test parts"),
                   *fig("reliability_external.png", "reliability diagrams on the external test set")]
    return blocks
