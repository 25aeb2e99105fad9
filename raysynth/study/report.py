"""Stage ``report``: aggregate the study into paired statistics, figures and a readable report.

Reads every earlier artifact and writes ``OUT/report/report.json`` (every per-fold metric, the
tests, the config and package versions), ``report.md`` (tables and figures) and PNG figures.
Everything in the Markdown is rebuilt from ``report.json`` and the config.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import time
from collections import defaultdict
from typing import Any

import numpy as np

from raysynth.config import Config
from raysynth.layout import Layout, read_json, write_json
from raysynth.study import figures
from raysynth.study.cv import load_results

log = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ["accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc"]
SEGMENTATION_METRICS = ["mean_dice", "mean_hd95"]
PACKAGES = ["raysynth", "ray", "torch", "diffusers", "monai", "nibabel", "nilearn", "pyarrow", "scikit-learn", "scipy", "numpy"]


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def fold_means(rows: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """Per arm, the metric of each fold averaged over seeds.

    Seeds of one fold share its split, so their results are not independent replicates; the
    unit of pairing is the fold (of each CV repeat), as the corrected resampled t-test assumes.
    """
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        v = r.get(metric)
        if v is not None and not (isinstance(v, float) and np.isnan(v)):
            acc[r["arm"]][r["fold"]].append(float(v))
    return {arm: {f: float(np.mean(v)) for f, v in by_fold.items()} for arm, by_fold in acc.items()}


def compare_arms(rows: list[dict], metrics: list[str], n_train: float, n_test: float) -> dict[str, dict[str, Any]]:
    """Each non-baseline arm against baseline, paired by fold (seed-averaged), for every metric."""
    from raysynth.study.stats import holm, paired_comparison

    arms = sorted({r["arm"] for r in rows} - {"baseline"})
    if not any(r["arm"] == "baseline" for r in rows):
        return {}
    out: dict[str, dict[str, Any]] = {arm: {} for arm in arms}
    for m in metrics:
        means = fold_means(rows, m)
        base = means.get("baseline", {})
        for arm in arms:
            folds = sorted(set(base) & set(means.get(arm, {})))
            if len(folds) < 2:
                out[arm][m] = {"n": len(folds), "note": "fewer than 2 paired folds"}
                continue
            a = np.array([base[f] for f in folds])
            b = np.array([means[arm][f] for f in folds])
            out[arm][m] = {**paired_comparison(a, b, n_train=n_train, n_test=n_test), "folds": folds}
        # Holm across arms, per metric: several arms are compared with one baseline.
        pvals = {arm: out[arm][m]["t_p"] for arm in arms if "t_p" in out[arm].get(m, {})}
        for arm, p_adj in holm(pvals).items():
            out[arm][m]["t_p_holm"] = p_adj
    return out


def summarise_arms(rows: list[dict], metrics: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_arm[r["arm"]].append(r)
    summary = {}
    for arm, rs in by_arm.items():
        summary[arm] = {}
        for m in metrics:
            vals = np.array([r.get(m, np.nan) for r in rs], dtype=float)
            vals = vals[~np.isnan(vals)]
            if len(vals):
                summary[arm][m] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                                   "n": int(len(vals))}
    return summary


def write_report(cfg: Config, layout: Layout) -> dict[str, Any]:
    from raysynth.data.prepare import load_prepared

    records, fingerprint, splits = load_prepared(layout)
    rows = load_results(layout)
    task = cfg.data.task
    candidates = CLASSIFICATION_METRICS if task == "classification" else SEGMENTATION_METRICS
    metrics = [m for m in candidates if any(m in r and r[m] is not None for r in rows)]
    n_train = float(np.mean([len(s["train"]) for s in splits]))
    n_test = float(np.mean([len(s["test"]) for s in splits]))
    comparisons = compare_arms(rows, metrics, n_train, n_test)
    generators = {}
    for s in splits:
        meta_path = layout.ddpm(s["fold"]) / "config.json"
        if meta_path.is_file():
            generators[s["fold"]] = read_json(meta_path)
    manifests = {}
    for s in splits:
        p = layout.synthetic(s["fold"]) / "manifest.json"
        if p.is_file():
            m = read_json(p)
            manifests[s["fold"]] = {k: v for k, v in m.items() if k != "samples"}
    quality = read_json(layout.quality / "quality.json") if (layout.quality / "quality.json").is_file() else None

    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": task,
        "dims": cfg.data.dims,
        "primary_metric": cfg.study.primary_metric,
        "primary_test": "paired t-test over folds, each fold's metric averaged over seeds (the paper's test); "
                        "Nadeau-Bengio corrected t-test beside it, because cross-validation training sets overlap and "
                        "the plain t-test is then too liberal; Wilcoxon signed-rank as a distribution-free check",
        "data": {k: fingerprint[k] for k in ("class_names", "counts", "num_records", "num_subjects") if k in fingerprint},
        "folds": len(splits),
        "metrics": metrics,
        "trials": [{k: v for k, v in r.items() if k != "metrics_json"} for r in rows],
        "summary": summarise_arms(rows, metrics),
        "comparisons": comparisons,
        "generators": generators,
        "synthetic": manifests,
        "quality": quality,
        "config": cfg.to_dict(),
        "packages": package_versions(),
    }
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    _figures(cfg, layout, report, records, rows)
    (out / "report.md").write_text(render_markdown(report))
    log.info("report: %s", out / "report.md")
    return report


def _figures(cfg: Config, layout: Layout, report: dict, records, rows: list[dict]) -> None:
    out = layout.report
    for m in report["metrics"]:
        figures.save_fold_metric(out / f"per_fold_{m}.png", fold_means(rows, m), m)
    primary = cfg.study.primary_metric if cfg.study.primary_metric in report["metrics"] else (report["metrics"] or [None])[0]
    if primary:
        means = fold_means(rows, primary)
        base = means.get("baseline", {})
        diffs = {a: [v - base[f] for f, v in sorted(by_fold.items()) if f in base]
                 for a, by_fold in sorted(means.items()) if a != "baseline"}
        if diffs:
            figures.save_paired_differences(out / "paired_differences.png", diffs, primary)
    histories = {}
    for fold in report["generators"]:
        p = layout.ddpm(int(fold)) / "metrics.jsonl"
        if p.is_file():
            histories[int(fold)] = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    if histories:
        figures.save_loss_curves(out / "generator_loss.png", histories)
    _sample_figure(cfg, layout, records, report)


def _sample_figure(cfg: Config, layout: Layout, records, report: dict) -> None:
    """Real and synthetic samples side by side: one row pair per class (real, then synthetic)."""
    from raysynth.diffusion.sample import read_synthetic

    if not report["synthetic"]:
        return
    fold = min(int(f) for f in report["synthetic"])
    synthetic = read_synthetic(layout, fold)
    if synthetic is None:
        return
    images, masks, names = [], [], report["data"]["class_names"]
    for c in range(len(names)):
        real_c = np.flatnonzero(records.labels == c)[:8]
        syn_c = np.flatnonzero(synthetic.labels == c)[:8]
        if len(real_c) == 0 or len(syn_c) == 0:
            continue
        for src, idx in ((records, real_c), (synthetic, syn_c)):
            pad = 8 - len(idx)
            images.append(np.concatenate([src.images[idx], np.full((pad,) + src.images.shape[1:], -1.0, np.float32)]))
            if src.masks is not None:
                masks.append(np.concatenate([src.masks[idx], np.zeros((pad,) + src.masks.shape[1:], np.uint8)]))
    if images:
        figures.save_grid(layout.report / "real_vs_synthetic.png", np.concatenate(images),
                          np.concatenate(masks) if len(masks) == len(images) else None,
                          title="rows alternate: real, synthetic (per class: " + ", ".join(names) + ")", columns=8)
    if cfg.data.dims == 3:
        figures.save_orthogonal(layout.report / "synthetic_volumes.png", synthetic.images[:6],
                                synthetic.masks[:6] if synthetic.masks is not None else None,
                                title="synthetic volumes: axial, coronal, sagittal middle slices")


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"
    return str(x)


def render_markdown(report: dict) -> str:
    lines = [f"# raysynth report ({report['task']}, {report['dims']}D)", ""]
    d = report["data"]
    lines += [f"Data: {d.get('num_records')} real records of {d.get('num_subjects')} subjects; classes "
              + ", ".join(f"{n} ({d.get('counts', {}).get(n, '?')})" for n in d["class_names"])
              + f". {report['folds']} cross-validation folds; one generator per fold, trained on that fold's "
              "real training part only; test folds are real data only.", ""]
    lines += ["## Downstream models: mean (sd) over folds x seeds", ""]
    metrics = report["metrics"]
    lines += ["| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm, by_metric in report["summary"].items():
        lines.append(f"| {arm} | " + " | ".join(
            f"{_fmt(by_metric[m]['mean'])} ({_fmt(by_metric[m]['sd'])})" if m in by_metric else "n/a" for m in metrics) + " |")
    lines += ["", "## Paired comparison against baseline", "",
              f"Primary test: {report['primary_test']}.", "",
              "| arm | metric | folds | mean diff | 95% CI | t-test p | Holm p | Nadeau-Bengio p | Wilcoxon p | d_z |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, by_metric in report["comparisons"].items():
        for m, c in by_metric.items():
            if "mean_diff" not in c:
                lines.append(f"| {arm} | {m} | {c.get('n')} | {c.get('note', 'n/a')} | | | | | | |")
                continue
            lines.append(
                f"| {arm} | {m} | {c['n']} | {_fmt(c['mean_diff'])} | [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] | "
                f"{_fmt(c.get('t_p'))} | {_fmt(c.get('t_p_holm'))} | {_fmt(c.get('nb_p'))} | {_fmt(c.get('wilcoxon_p'))} | "
                f"{_fmt(c.get('cohen_dz'))} |")
    lines += ["", "![paired differences](paired_differences.png)", ""]
    for m in metrics:
        lines.append(f"![{m} per fold](per_fold_{m}.png)")
    lines += ["", "## Generators and synthetic data", ""]
    for fold, g in sorted(report["generators"].items(), key=lambda kv: int(kv[0])):
        syn = report["synthetic"].get(fold) or report["synthetic"].get(str(fold)) or {}
        lines.append(f"- fold {fold}: `{g['generator_id']}`, {g['process']} process, {g['num_train_images']} real "
                     f"training images, {g['steps']} steps, final loss {_fmt(g.get('final_loss'), 4)}; "
                     f"{syn.get('num_samples', 0)} synthetic samples ({syn.get('sampler')}, {syn.get('steps')} steps): "
                     + ", ".join(f"{k} {v}" for k, v in (syn.get("counts") or {}).items()))
    lines += ["", "![generator loss](generator_loss.png)", "", "![real and synthetic samples](real_vs_synthetic.png)", ""]
    if report["dims"] == 3:
        lines += ["![synthetic volumes](synthetic_volumes.png)", ""]
    q = report.get("quality")
    if q:
        lines += ["## Quality and privacy", "", "```", json.dumps(_quality_headline(q), indent=2), "```", ""]
    lines += ["## Packages", "", ", ".join(f"{k} {v}" for k, v in report["packages"].items()), ""]
    return "\n".join(lines)


def _quality_headline(q: dict) -> dict:
    keep = ("privacy_passed", "encoder", "gate")
    return {k: q[k] for k in keep if k in q} or {k: q[k] for k in list(q)[:5]}


def summary_lines(report: dict) -> list[str]:
    """The short summary printed at the end of a run."""
    lines = []
    primary = report["primary_metric"] if report["primary_metric"] in report["metrics"] else (report["metrics"] or [""])[0]
    for arm, by_metric in report["summary"].items():
        if primary in by_metric:
            lines.append(f"{arm:>12}: {primary} {by_metric[primary]['mean']:.3f} (sd {by_metric[primary]['sd']:.3f}, n={by_metric[primary]['n']})")
    for arm, by_metric in report["comparisons"].items():
        c = by_metric.get(primary, {})
        if "mean_diff" in c:
            lines.append(f"{arm} - baseline: {c['mean_diff']:+.3f} [95% CI {c['ci_low']:+.3f}, {c['ci_high']:+.3f}], "
                         f"paired t p={c.get('t_p', float('nan')):.3g}, Wilcoxon p={c.get('wilcoxon_p', float('nan')):.3g}")
    q = report.get("quality")
    if q and "privacy_passed" in q:
        lines.append(f"privacy gate: {'passed' if q['privacy_passed'] else 'FAILED'}")
    return lines
