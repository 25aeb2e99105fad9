"""``raysynth status OUT``: what an output folder holds, read from its artifacts alone.

Each stage of the main flow is *complete*, *partial* ("3 of 4 folds trained"), *stale* (made with
another config than the one given) or *missing*, judged by the same digests and completeness checks
the stages use to skip finished work (:mod:`raysynth.artifacts`). Then the figures so far: the
primary metric per condition (report.json, else the study's finished trials), the privacy gate's
verdict and each fold's Frechet distance against its real-vs-real reference; and where the report is.

Nothing here starts Ray or writes to the output. A URI output is first pulled into its staging
folder, as before any stage (:mod:`raysynth.storage`); nothing is pushed.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from raysynth import artifacts as art
from raysynth.analysis.aggregate import fold_means
from raysynth.artifacts import Layout, fraction_tag, read_json
from raysynth.config import Config
from raysynth.data.external import BUILTIN, external_source
from raysynth.data.sources import source_signature
from raysynth.design import conditions, generator_fractions
from raysynth.errors import InputError, StageError
from raysynth.render.text import num, primary_metric
from raysynth.storage import remote_output

STAGES = ("prepare", "autoencoder", "train", "sample", "quality", "study", "robustness", "report")
"""The main flow, as ``pipeline.STAGES`` (a library module may not import the pipeline; a test checks)."""


def open_output(out: str | os.PathLike) -> Layout:
    """The Layout of an existing output; a URI is pulled into its staging folder first.
    Raises :class:`InputError` naming the path when it is not a raysynth output."""
    layout = Layout.at(out)
    if layout.remote:
        remote_output(layout.remote, str(layout.root)).pull()
    folders = (layout.prepared, layout.ddpm(0).parent, layout.synthetic(0).parent, layout.quality, layout.study,
               layout.robustness, layout.report, layout.tune)
    if not layout.root.is_dir():
        raise InputError(f"{layout.location}: no such folder, so not a raysynth output")
    if not any(f.is_dir() for f in folders):
        raise InputError(f"{layout.location} is not a raysynth output: it has none of "
                         + ", ".join(f"{f.name}/" for f in folders))
    return layout


def collect(layout: Layout, cfg: Config) -> dict[str, Any]:
    """The status of ``layout`` against ``cfg``: plain data, strict-JSON ready (see :func:`render`)."""
    folds = _folds(layout, cfg)
    gens = [(k, p) for k in folds for p in generator_fractions(cfg)]
    noun = "folds" if len(gens) == len(folds) else "generators"
    stages = {"prepare": _prepare(layout, cfg, len(folds))}
    stages["autoencoder"] = (_rollup({_unit(k, p): _autoencoder(layout, cfg, k, p) for k, p in gens}, noun, "trained")
                             if cfg.diffusion.space == "latent" else
                             {"state": "unused", "done": 0, "total": 0, "detail": "diffusion.space is pixel"})
    stages["train"] = _rollup({_unit(k, p): _generator(layout, cfg, k, p) for k, p in gens}, noun, "trained")
    manifests: dict[tuple[int, float], Optional[dict]] = {g: None for g in gens}
    units = {}
    for k, p in gens:
        units[_unit(k, p)], manifests[(k, p)] = _synthetic(layout, cfg, k, p)
    stages["sample"] = _rollup(units, noun, "sampled")
    ready = [k for k in folds if (manifests.get((k, 1.0)) or {}).get("shards")]
    why = art.quality_outdated(layout, cfg, ready)
    stages["quality"] = _single({None: "current", "missing": "missing", "config": "stale"}.get(why, "partial"), {
        None: f"{len(ready)} of {len(folds)} folds assessed", "missing": "", "config": "made with another config",
        "folds": f"assessed other folds than the {len(ready)} sampled now", "figures": "a figure is missing"}[why])
    try:
        trials = art.finished_trials(cfg, layout)
    except StageError:
        trials = []
    stages["study"] = _study(layout, cfg, len(folds), trials)
    stages["robustness"] = _robustness(layout, cfg, folds)
    why = art.report_outdated(layout)
    study_done = stages["study"]["state"] == "complete"
    stages["report"] = _single("missing" if why == "missing" else "current" if why is None and study_done else "stale",
                               "" if why == "missing" else "the study's results changed since" if why else
                               "up to date with the study" if study_done else f"the study is {stages['study']['state']}")
    html = layout.report / "report.html"
    return {"out": layout.location, "staging": str(layout.root) if layout.remote else None,
            "config_digest": cfg.digest(), "stages": [{"stage": n, **stages[n]} for n in STAGES],
            "figures": _figures(layout, cfg, trials, stages), "report_html": str(html) if html.is_file() else None}


def render(status: dict[str, Any]) -> list[str]:
    """The status as plain text lines."""
    where = status["out"] + (f" (staged in {status['staging']})" if status["staging"] else "")
    lines = [f"{where}, against config {status['config_digest']}:"]
    lines += [f"  {s['stage']:<11} {s['state']:<9} {s['detail']}".rstrip() for s in status["stages"]]
    present = [s["state"] for s in status["stages"] if s["state"] not in ("missing", "unused")]
    if present and all(s == "stale" for s in present):
        lines.append("  every artifact is stale for this config: give the --preset, --config and --set the run used")
    f = status["figures"]
    if f["arms"]:
        lines.append(f"{f['primary_metric']} per condition, mean over splits (from {f['source']}):")
        lines += [f"  real {a['real_fraction']:>4.0%} {a['condition']:>24}: {num(a['mean'], '.3f')} "
                  f"({a['n_splits']} split{'' if a['n_splits'] == 1 else 's'})" for a in f["arms"]]
    if f["privacy"]:
        lines.append(f"privacy gate: {f['privacy']['verdict']}" + ("" if f["privacy"]["current"] else " (stale)"))
    if f["quality"]:
        lines.append("FD synthetic / real-vs-real: " + ", ".join(
            f"fold {q['fold']} {num(q['fd'], '.4g')} / {num(q['reference_fd'], '.4g')} = {num(q['fd_ratio'], '.2f')}"
            for q in f["quality"]) + ("" if f["quality_current"] else " (stale)"))
    lines.append(f"report: {status['report_html'] or 'not written yet'}")
    return lines


def _autoencoder(layout: Layout, cfg: Config, fold: int, fraction: float) -> str:
    meta = _load(layout.autoencoder(fold, fraction) / art.AUTOENCODER_META)
    if meta is None:
        return "partial" if (layout.ray_storage / f"autoencoder_fold_{fold}{fraction_tag(fraction)}").is_dir() else "missing"
    return "current" if art.autoencoder_complete(cfg, layout, fold, fraction) else "stale"


def _unit(fold: int, fraction: float) -> str:
    return f"fold {fold}{fraction_tag(fraction)}"


def _load(path) -> Optional[Any]:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _folds(layout: Layout, cfg: Config) -> list[int]:
    """The folds of ``splits.json`` when it is readable, else the ones ``cfg`` asks for."""
    try:
        return [int(f["fold"]) for f in read_json(layout.splits)["folds"]]
    except (OSError, ValueError, KeyError, TypeError):
        return list(range(cfg.cv.folds * cfg.cv.repeats))


def _single(state: str, detail: str) -> dict[str, Any]:
    return {"state": "complete" if state == "current" else state, "done": int(state == "current"), "total": 1,
            "detail": detail}


def _rollup(units: dict[str, str], noun: str, verb: str) -> dict[str, Any]:
    """A stage of several units ("current", "partial", "stale" or "missing" each)."""
    done = sum(s == "current" for s in units.values())
    states = set(units.values())
    state = "complete" if units and states == {"current"} else "partial" if done or "partial" in states \
        else "stale" if "stale" in states else "missing"
    detail = f"{done} of {len(units)} {noun} {verb}" if state != "missing" else ""
    for s in ("stale", "partial"):
        names = [u for u, v in units.items() if v == s]
        if names and state != "missing":
            detail += f"; {'in progress' if s == 'partial' else s}: " + ", ".join(names[:4]) + (" ..." if names[4:] else "")
    return {"state": state, "done": done, "total": len(units), "detail": detail, "units": units}


def _prepare(layout: Layout, cfg: Config, n_folds: int) -> dict[str, Any]:
    why = art.prepared_outdated(layout, cfg, source_signature(cfg.data.source))
    if why == "missing":
        started = any(p.is_file() for p in (layout.data_parquet, layout.splits))
        return _single("partial" if started else "missing", "interrupted: no fingerprint.json" if started else "")
    if why is not None:
        return _single("stale", "made with another data/cv config" if why == "config" else
                       "the files under data.source changed since")
    try:
        art.read_subsets(layout, cfg)
    except StageError:
        return _single("partial", "subsets.json lacks a real fraction the study asks for")
    return _single("current", f"{(_load(layout.fingerprint) or {}).get('num_records')} records, {n_folds} folds")


def _generator(layout: Layout, cfg: Config, fold: int, fraction: float) -> str:
    if art.generator_complete(cfg, layout, fold, fraction):
        return "current"
    if not (layout.ddpm(fold, fraction) / art.GENERATOR_META).is_file():
        return "missing"
    try:
        art.generator_meta(layout, fold, fraction, cfg)
    except StageError:
        return "stale"
    return "partial"  # its config.json without a checkpoint


def _synthetic(layout: Layout, cfg: Config, fold: int, fraction: float) -> tuple[str, Optional[dict]]:
    """A synthetic set's state and, when current, its manifest (written once all its shards exist)."""
    if art.read_manifest(layout, fold, fraction) is None:
        return ("partial" if art.existing_shards(layout.synthetic(fold, fraction)) else "missing"), None
    try:
        return "current", art.read_manifest(layout, fold, fraction, cfg)
    except StageError:  # another sampling config, or an older generator
        return "stale", None


def _study(layout: Layout, cfg: Config, n_folds: int, trials: list[dict]) -> dict[str, Any]:
    total = len(conditions(cfg)) * len(cfg.study.real_fractions) * n_folds * len(cfg.study.seeds)
    files = len(list(layout.study_trials.glob("*.json"))) if layout.study_trials.is_dir() else 0
    try:
        art.load_results(layout, cfg)
        gathered = True
    except StageError:
        gathered = False
    done = min(len(trials), total)
    state = "complete" if gathered and done == total else "partial" if trials else \
        "stale" if files or (layout.study / art.STUDY_JSON).is_file() else "missing"
    detail = "" if state == "missing" else f"{done} of {total} trials done" + \
        ("; results not gathered yet" if done == total and not gathered else "") + \
        (f"; {files - len(trials)} stale trial files" if files > len(trials) else "")
    return {"state": state, "done": done, "total": total, "detail": detail}


def _robustness(layout: Layout, cfg: Config, folds: list[int]) -> dict[str, Any]:
    """One unit per split, as the stage evaluates them (``OUT/robustness/splits/<fold>.json``)."""
    source = external_source(cfg)
    digest = art.robustness_digest(cfg, source, source_signature(source) if source not in (None, BUILTIN) else None)
    units = {}
    for k in folds:
        saved = _load(layout.robustness / "splits" / f"{k}.json")
        units[f"split {k}"] = "missing" if saved is None else "current" if saved.get("digest") == digest else "stale"
    stage = _rollup(units, "splits", "evaluated")
    if stage["state"] == "complete" and (art.read_robustness(layout) or {}).get("digest") != digest:
        stage.update(state="partial", detail=stage["detail"] + "; robustness.json not gathered yet")
    return stage


def _figures(layout: Layout, cfg: Config, trials: list[dict], stages: dict[str, dict]) -> dict[str, Any]:
    report = _load(layout.report / art.REPORT_JSON)
    metric, arms, source = None, [], None
    if report and report.get("summary") and (stages["report"]["state"] == "complete" or not trials):
        metric = primary_metric(report)
        source = "report.json" + ("" if stages["report"]["state"] == "complete" else ", stale")
        arms = [{"real_fraction": float(p), "condition": c, "mean": cell[metric]["mean"],
                 "n_splits": cell[metric].get("n_splits")}
                for p in sorted(report["summary"], key=float, reverse=True)
                for c, cell in report["summary"][p].items() if metric in cell]
    elif trials:
        metric, source = cfg.study.primary_metric, f"{len(trials)} finished study trials"
        rows = [{**t["metrics"], "condition": t["condition"], "real_fraction": t["real_fraction"], "fold": t["fold"]}
                for t in trials]
        arms = [{"real_fraction": float(p), "condition": c, "mean": float(np.mean(list(by_fold.values()))),
                 "n_splits": len(by_fold)}
                for p, by_c in sorted(fold_means(rows, metric).items(), key=lambda kv: -float(kv[0]))
                for c, by_fold in by_c.items()]
    quality = art.read_quality(layout) if (layout.quality / art.QUALITY_JSON).is_file() else None
    privacy, fds = None, []
    if quality and "privacy_passed" in quality:
        privacy = {"verdict": quality.get("privacy_verdict") or ("passed" if quality["privacy_passed"] else "failed"),
                   "passed": bool(quality["privacy_passed"]), "current": stages["quality"]["state"] == "complete"}
    for f in (quality or {}).get("folds", []):
        overall = f.get("metrics", {}).get("overall", {})
        fd, ref = overall.get("synthetic_matched", {}).get("fd"), overall.get("reference", {}).get("fd")
        fds.append({"fold": f.get("fold"), "fd": fd, "reference_fd": ref,
                    "fd_ratio": fd / ref if fd is not None and ref else None})
    return {"primary_metric": metric, "source": source, "arms": arms, "privacy": privacy, "quality": fds,
            "quality_current": stages["quality"]["state"] == "complete"}
