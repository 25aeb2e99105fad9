"""What the report says, as a list of blocks built from report.json alone (see ``html.py``).

The methods text is generated from the config stored in report.json, so it always describes
the run that produced the numbers beside it.
"""

from __future__ import annotations

import math

import numpy as np

import yaml

from raysynth.config import StudyConfig
from raysynth.render.html import (
    Block,
    Bullets,
    Figure,
    Heading,
    Paragraph,
    Preformatted,
    Table,
)
from raysynth.render.robust_document import robustness_blocks
from raysynth.render.text import ALPHA, fmt, num, pct, primary_metric


def methods(report: dict) -> list[str]:
    """Methods paragraphs, generated from the stored config and design."""
    cfg, d, design = report["config"], report["data"], report["design"]
    df, s, st, cv = cfg["diffusion"], cfg["sampling"], cfg["study"], cfg["cv"]
    sizes = design["sizes"]
    n_splits = design["folds_per_repeat"] * design["repeats"]
    classes = ", ".join(f"{n} ({d.get('counts', {}).get(n, '?')})" for n in d["class_names"])
    source = cfg["data"]["source"] or "the embedded MNI152-based cohort"
    shape = "x".join(str(v) for v in d.get("shape", []))
    fractions = sorted(design["real_fractions"], reverse=True)
    frac_text = ", ".join(f"{pct(p)} (mean {sizes.get(f'{p:g}', {}).get('n_real', float('nan')):.0f} images)"
                          for p in fractions)
    ratios = ", ".join(f"{r:g}" for r in design["ratios"])
    balance = ("every class gets r times the largest real class" if s["class_balance"] == "balanced"
               else "every class gets r times its own real count")
    lr = st["learning_rate"] if st["learning_rate"] is not None else StudyConfig.default_learning_rate(report["task"])
    arms = "; ".join(f"{a}: {StudyConfig.ARMS.get(a, a)}" for a in design["arms"])
    out = [
        f"Data. {d.get('num_records')} real {report['dims']}D images of {d.get('num_subjects')} subjects from {source}, "
        f"classes {classes}, preprocessed to {shape} voxels with intensities scaled to [-1, 1] "
        f"(percentiles {cfg['data']['low_percentile']:g}-{cfg['data']['high_percentile']:g}). " + duplicates_sentence(d),
        f"Design. Stratified, subject-grouped {design['folds_per_repeat']}-fold cross-validation repeated "
        f"{design['repeats']} time(s) (seed {cv['seed']}), {n_splits} splits in all, written once and read by every "
        f"condition and seed. Real training data per split: {frac_text}; the smaller sizes are nested, stratified "
        f"subsets of each split's training part (seeded; prepared/subsets.json). Test data: the split's whole real "
        f"test part, for every size and condition. Each condition is trained with seeds {design['seeds']}.",
        f"Generators. One class-conditional {df['process']} diffusion model per split and real-data size, trained only "
        f"on that size's real training images (a UNet with widths {df['channels']}, {df['train_steps']} steps of batch "
        f"{df['batch_size']}, AdamW at {df['learning_rate']:g}, EMA {df['ema_decay']:g}"
        + (f", at most {df['max_train_images']} images" if df["max_train_images"] else "")
        + f"), sampled with the {s['sampler']} sampler in {s['steps']} steps. Synthetic-to-real ratios r: {ratios} "
        f"({balance}); each generator is sampled once at the largest ratio and a smaller ratio takes the first "
        f"samples of each class, so the sets are nested.",
        f"Conditions. {arms}. Classical augmentation (MONAI, per training batch): random flips on every axis, affine "
        f"(rotation up to 15 degrees, scale +-10%, translation +-2 voxels), elastic deformation (2D), bias field, "
        f"gamma contrast (0.7-1.5) and Gaussian noise.",
        f"Downstream model. A VGG-style CNN of width {st['width']} ({report['task']}), AdamW at learning rate {lr:g} with "
        f"a cosine schedule, {st['epochs']} epochs, batch {st['batch_size']}, on {st['cpus_per_trial']} CPU(s) and "
        f"{st['gpus_per_trial']:g} GPU per Ray Tune trial. Metrics on the real test part: {', '.join(report['metrics'])} "
        "(for more than two classes, sensitivity and specificity are macro averages and AUC is macro one-vs-rest).",
        f"Statistics. Each metric is averaged over seeds within a split, and conditions are compared with baseline at "
        f"the same real-data size, paired by split. Primary test: the {report['primary_test']['label']}, because "
        f"{report['primary_test']['why']}. Also reported: the paired t-test, the Wilcoxon signed-rank test, a BCa "
        f"bootstrap 95% interval of the mean paired difference (10000 resamples), and Cohen's d_z and Hedges' g_z. "
        f"Intervals of single conditions are Nadeau-Bengio corrected t intervals over splits, clipped to the metric's range "
        f"(0 to 1 for accuracy, sensitivity, specificity, AUC, ECE and Dice; differences to -1 to 1). In the correction, "
        f"n_train is the number of real training images at that real-data size and n_test the size of the test part.",
    ]
    return out


def duplicates_sentence(data: dict) -> str:
    """What prepare found and did about exact and near-duplicate images (fingerprint.json)."""
    dup = data.get("duplicates") or {}
    if "num_groups" not in dup:
        why = dup.get("not_run")
        return f"Duplicates: not searched ({why})." if why else ""
    done = {"group": "each group was made one subject, so no group spans a training and a test part",
            "drop": f"one image per group was kept ({dup.get('num_dropped', 0)} dropped)",
            "keep": "they were kept as they are, so a group may span folds and inflate the metrics"}[dup["policy"]]
    return (f"Duplicates: {dup['num_groups']} groups of exact or near-duplicate images ({dup['num_grouped_images']} "
            f"images, {dup['num_exact']} exact copies) at normalised correlation >= {dup['threshold']:g} "
            f"({dup['method']}); {done}.")


def answer(report: dict) -> list[str]:
    """The summary a researcher reads first: does synthetic data help here, by how much, how sure;
    then the quality and privacy verdicts. Read off the corrected intervals, never tuned."""
    m, out = primary_metric(report), []
    for p in sorted(report["comparisons"], key=float, reverse=True):
        rows = [(c, r[m]) for c, r in report["comparisons"][p].items()
                if c.split(" ")[0] in StudyConfig.SYNTHETIC_ARMS and "mean_diff" in r.get(m, {})]
        if not rows:
            continue
        above = [c for c, r in rows if _finite(r.get("nb_ci_low")) and r["nb_ci_low"] > 0]
        below = [c for c, r in rows if _finite(r.get("nb_ci_high")) and r["nb_ci_high"] < 0]
        best_c, best = max(rows, key=lambda cr: cr[1]["mean_diff"] if _finite(cr[1]["mean_diff"]) else -math.inf)
        tested = [c for c, r in rows if _finite(r.get("nb_ci_low")) and _finite(r.get("nb_ci_high"))]
        of = f"{len(rows)} synthetic condition{'s' if len(rows) > 1 else ''}"
        verdict = (f"it helps: {len(above)} of {of} {'has' if len(above) == 1 else 'have'} a corrected 95% CI above 0"
                   if above else
                   f"it hurts: {len(below)} of {of} {'has' if len(below) == 1 else 'have'} a corrected 95% CI below 0"
                   if below else f"not shown: the corrected 95% CI of {len(tested)} of {of} includes 0"
                   + ("" if len(tested) == len(rows) else f", and {len(rows) - len(tested)} had no interval "
                      "(too few splits, or no variance over them)") if tested else
                   f"unknown: none of the {of} has a corrected interval (too few splits, or no variance over them)")
        out.append(f"Does synthetic data help at {pct(p)} real data? {verdict[0].upper()}{verdict[1:]}. The largest "
                   f"mean change of {m} is {best_c}'s {num(best['mean_diff'], '+.3f')} (corrected 95% CI "
                   f"{fmt(best.get('nb_ci_low'))} to {fmt(best.get('nb_ci_high'))}, over {best.get('n', '?')} splits); "
                   "picked as the largest, so read it with its interval.")
    q = report.get("quality") or {}
    if q:
        verdict = q.get("privacy_verdict") or ("passed" if q.get("privacy_passed") else "failed")
        ratios = [f["metrics"]["overall"]["synthetic_matched"]["fd"] / f["metrics"]["overall"]["reference"]["fd"]
                  for f in q.get("folds", []) if _finite(f.get("metrics", {}).get("overall", {}).get("synthetic_matched", {}).get("fd"))
                  and (f["metrics"]["overall"]["reference"].get("fd") or 0) > 0]
        fd = (f"; Frechet distance of synthetic to real training images {num(float(np.median(ratios)), '.2f')}x the "
              "real-vs-real reference (median over splits; 1 is as close as real images are to each other)") if ratios else ""
        out.append(f"Privacy gate: {verdict}{fd}.")
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def findings(report: dict) -> list[str]:
    """One sentence per condition and size on the primary metric, read off the corrected test."""
    m, out = primary_metric(report), []
    for p in sorted(report["comparisons"], key=float, reverse=True):
        for c, by_metric in report["comparisons"][p].items():
            r = by_metric.get(m, {})
            if "mean_diff" not in r:
                continue
            holm_p = r.get("nb_p_holm")  # None (null in report.json): no test was possible
            verdict = ("no test possible" if holm_p is None or math.isnan(holm_p) else
                       "significant after Holm correction" if holm_p < ALPHA else "not significant after Holm correction")
            out.append(f"Real data {pct(p)}, {c}: {m} {num(r['mean_b'], '.3f')} against baseline {num(r['mean_a'], '.3f')}, difference "
                       f"{num(r['mean_diff'], '+.3f')} (corrected 95% CI {fmt(r['nb_ci_low'])} to {fmt(r['nb_ci_high'])}; "
                       f"bootstrap {fmt(r['boot_ci_low'])} to {fmt(r['boot_ci_high'])}; "
                       f"corrected p = {fmt(r.get('nb_p'))}, Holm {fmt(holm_p)}; paired t p = {fmt(r.get('t_p'))}): "
                       f"{verdict} at {ALPHA:g}.")
    return out


def _summary_table(report: dict) -> Table:
    metrics = report["metrics"]
    rows = []
    for p in sorted(report["summary"], key=float, reverse=True):
        for c in report["design"]["conditions"]:
            cell = report["summary"][p].get(c)
            if cell:
                rows.append((pct(p), c, *[f"{fmt(cell[m]['mean'])} [{fmt(cell[m]['nb_ci_low'])}, {fmt(cell[m]['nb_ci_high'])}]"
                                         if m in cell else "n/a" for m in metrics]))
    return Table(("real data", "condition", *metrics), tuple(rows),
                 "mean over splits (seed-averaged) [Nadeau-Bengio corrected 95% CI]")


def _comparison_table(report: dict) -> Table:
    shown = [m for m in dict.fromkeys((primary_metric(report), "auc")) if m in report["metrics"]]
    rows = []
    for p in sorted(report["comparisons"], key=float, reverse=True):
        for c, by_metric in report["comparisons"][p].items():
            for m in shown:
                r = by_metric.get(m, {})
                if "mean_diff" not in r:
                    rows.append((pct(p), c, m, str(r.get("n", 0)), r.get("note", "n/a"), *[""] * 10))
                    continue
                rows.append((pct(p), c, m, str(r["n"]), fmt(r["mean_diff"]),
                             f"[{fmt(r['nb_ci_low'])}, {fmt(r['nb_ci_high'])}]",
                             f"[{fmt(r['boot_ci_low'])}, {fmt(r['boot_ci_high'])}]",
                             fmt(r.get("nb_p")), fmt(r.get("nb_p_holm")), fmt(r.get("t_p")), fmt(r.get("t_p_holm")),
                             fmt(r.get("wilcoxon_p")), fmt(r.get("cohen_dz")), fmt(r.get("hedges_gz"))))
    return Table(("real data", "condition", "metric", "splits", "mean diff", "corrected 95% CI", "bootstrap 95% CI",
                  "corrected p",
                  "corrected p (Holm)", "paired t p", "paired t p (Holm)", "Wilcoxon p", "d_z", "g_z"), tuple(rows),
                 "condition minus baseline, paired by split; every metric and interval is in report.json")


def _generator_table(report: dict) -> Table:
    rows = []
    curated = any((report["synthetic"].get(name) or {}).get("curation") for name in report["generators"])
    for name, g in report["generators"].items():
        syn = report["synthetic"].get(name, {})
        row = (f"split {name}", pct(g.get("fraction", 1.0)), str(g["num_train_images"]), str(g["steps"]),
               fmt(g.get("final_loss"), 4), str(syn.get("num_samples", 0)),
               ", ".join(f"{k} {v}" for k, v in (syn.get("counts") or {}).items()))
        if curated:
            cur = syn.get("curation") or {}
            row += (f"{cur.get('num_kept', '?')} ({', '.join(f'{k} {v}' for k, v in (cur.get('kept') or {}).items())})"
                    if cur else "not curated",)
        rows.append(row)
    header = ("generator", "real data", "real training images", "steps", "final loss", "synthetic samples", "per class")
    if not curated:
        return Table(header, tuple(rows))
    thresholds = sorted({fmt((report["synthetic"][n].get("curation") or {}).get("threshold")) for n in report["generators"]
                         if n in report["synthetic"]})
    return Table((*header, "kept by curation"), tuple(rows),
                 f"curation (sampling.curate): a sample is kept when a network trained on the generator's own real "
                 f"training part scores it at least {', '.join(thresholds)} (classification: the probability of its "
                 "label; segmentation: Dice with its generated mask); study arms draw from the kept samples only")


def _quality_blocks(q: dict) -> list[Block]:
    rows = []
    for f in q.get("folds", []):
        overall = f.get("metrics", {}).get("overall", {})
        ref, syn = overall.get("reference", {}), overall.get("synthetic_matched", {})
        gate = f.get("gate", {})
        rows.append((f"split {f['fold']}", fmt(syn.get("fd")), fmt(ref.get("fd")), fmt(syn.get("precision")),
                     fmt(syn.get("recall")), f"{gate.get('count', '?')}/{gate.get('total', '?')}",
                     "passed" if gate.get("passed") else "FAILED" if gate.get("discriminates", True)
                     else "cannot discriminate"))
    verdict = q.get("privacy_verdict") or ("passed" if q.get("privacy_passed") else "failed")
    blind = [f"split {f['fold']}: {f['gate']['why']}" for f in q.get("folds", []) if not f.get("gate", {}).get(
        "discriminates", True)]
    why = (" It is not a pass: the gate could not discriminate (" + "; ".join(blind) + ").") if blind else ""
    blocks: list[Block] = [
        Paragraph(f"Privacy gate: {verdict.upper() if verdict != 'passed' else verdict}.{why} Quality and "
                  "privacy are measured for the generators trained on each split's whole training part."),
        Table(("split", "Frechet distance", "real-vs-real reference", "precision", "recall", "near-copies", "gate"),
              tuple(rows), "features from an encoder trained on the split's real training images")]
    if q.get("reconstruction"):
        seg = any("mask_dice" in r for r in q["reconstruction"])
        blocks.append(Table(
            ("split", "test images", "PSNR (dB)", "SSIM", "MS-SSIM") + (("mask Dice",) if seg else ()),
            tuple((f"split {r['fold']}", str(r["n"]), fmt(r["psnr"]), fmt(r["ssim"]),
                   fmt(r.get("ms_ssim")))
                  + ((fmt(r.get("mask_dice")),) if seg else ()) for r in q["reconstruction"]),
            "Latent space: the split's autoencoder reconstructing the split's real test images (a measurement "
            "only, never used for training or selection): what is lost before diffusion starts"))
    return blocks


def build_document(report: dict, figures: set[str]) -> tuple[str, list[Block]]:
    """The report's title and blocks; ``figures`` are the figure names that exist."""
    title = f"raysynth study report ({report['task']}, {report['dims']}D)"
    m = primary_metric(report)
    fig = lambda name, caption: [Figure(name, caption)] if name in figures else []  # noqa: E731
    blocks: list[Block] = [Heading(1, title), Paragraph(f"Created {report['created']}. Primary metric: {m}. "
                                                       f"Primary test: {report['primary_test']['label']}.")]
    summary = answer(report)
    if summary:
        blocks += [Heading(2, "Summary"), Bullets(tuple(summary))]
    found = findings(report)
    if found:
        blocks += [Heading(2, "Findings"), Bullets(tuple(found))]
    blocks += [Heading(2, "Methods"), *[Paragraph(t) for t in methods(report)]]
    blocks += [Heading(2, "Downstream models against real-data size"), _summary_table(report),
               *fig(f"learning_curve_{m}.png", f"{m} against real-data size, per condition, corrected 95% CI"),
               *fig("learning_curve_auc.png", "AUC against real-data size, per condition, corrected 95% CI")]
    if len(report["design"]["sizes"]) < 2:
        blocks.append(Paragraph("No learning curve: it needs several real-data sizes (set study.real_fractions, "
                                "e.g. [0.25, 0.5, 1.0])."))
    if report["comparisons"]:
        n = report["design"]["folds_per_repeat"] * report["design"]["repeats"]
        blocks += [Heading(2, "Paired comparison against baseline"),
                   Paragraph(f"With {n} splits the smallest two-sided Wilcoxon p-value is {2 / 2 ** n:.3g}, and every "
                             "test has little power: read the mean difference and its corrected interval first. A "
                             "bootstrap interval of a mean of few values cannot be wider than their range, so below "
                             "about ten splits it understates the uncertainty."),
                   _comparison_table(report),
                   *fig("paired_differences.png", f"{m}: per-split differences from baseline, mean and corrected 95% CI")]
    if "roc.png" in figures or "confusion.png" in figures:
        blocks += [Heading(2, "ROC curves and confusion matrices"),
                   *fig("roc.png", "ROC curves from predictions.parquet, pooled over splits and seeds (pooled AUC in the legend)"),
                   *fig("confusion.png", "confusion matrices, summed over splits and seeds, row-normalised")]
    blocks += robustness_blocks(report, figures)
    blocks += [Heading(2, "Generators and synthetic data"), _generator_table(report),
               *fig("real_vs_synthetic.png", "real training images and synthetic samples per class and real-data size"),
               *fig("synthetic_volumes.png", "synthetic volumes, orthogonal middle slices"),
               *fig("generator_loss.png", "generator training loss")]
    if report.get("quality"):
        blocks += [Heading(2, "Quality and privacy"), *_quality_blocks(report["quality"])]
    blocks += [Heading(2, "Reproducibility"),
               Paragraph("Every number and figure here is rebuilt from report.json: `raysynth report` re-renders it, or "
                         "call raysynth.stages.report.render_from_json('report.json', 'out/')."),
               Table(("package", "version"), tuple((k, v) for k, v in report["packages"].items())),
               Heading(3, "Config"), Preformatted(yaml.safe_dump(report["config"], sort_keys=False).rstrip())]
    return title, blocks
