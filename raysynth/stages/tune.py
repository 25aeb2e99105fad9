"""Stage ``tune``: a Ray Tune search over gamma, the learning rate and the process, scored on sample quality.

Losses at different gammas live on different noise scales (sigma_max = sqrt(2 gamma)), so they
cannot rank trials; every trial is scored instead by the Fréchet distance (FD, Ledoit-Wolf
covariance as in the quality stage) between encoder features of its class-conditional samples
and of held-out real images. ASHA stops trials whose FD trails at its rungs.

No test data: only fold ``fold``'s *training* part is read. It is split (stratified by label,
grouped by subject, seeded) into a generator-training part and a validation part; the quality
encoder is fitted on the generator-training part only. Each trial trains with
:class:`~raysynth.diffusion.trainer.GeneratorFit`, the same step as ``raysynth train``.

Output, ``OUT/tune/``: ``results.parquet`` (one row per trial), ``best.yaml`` (a full config
``raysynth train --config`` accepts), ``tune.json`` (space, settings, split, encoder, best
trial; written last, it marks the stage complete), ``fd_vs_gamma.png`` and ``fd_vs_lr.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray.tune as tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from raysynth.artifacts import TUNE_FILES, TUNE_JSON, Layout, mask_classes, read_json, read_prepared
from raysynth.config import Config, ConfigError, TuningConfig
from raysynth.console import Progress
from raysynth.design import generator_train_ids, largest_remainder
from raysynth.diffusion.process import PROCESSES as PROCESS_CLASSES
from raysynth.diffusion.trainer import training_tensors
from raysynth.diffusion.tune_trial import COVARIANCE, trial_diffusion, tune_trial
from raysynth.data.splits import holdout_split
from raysynth.errors import InputError, StageError
from raysynth.io import write_json, write_table, write_text
from raysynth.quality.features import random_encoder, train_encoder
from raysynth.quality.metrics import frechet_distance
from raysynth.render.tune_figures import plot_trials
from raysynth.runtime import derive_seed, ensure_ray

log = logging.getLogger(__name__)

TUNE_VERSION = 1
FALLBACK_SAMPLER = {"ddpm": "ddim", "gamma": "heun", "flow": "euler"}
_SEED_SPLIT, _SEED_ENCODER, _SEED_SEARCH = 101, 105, 106  # 102-104: diffusion.tune_trial
SEARCHED = ("process", "gamma", "learning_rate")  # diffusion fields the trials set

# The settings are the fields of the config's ``tune`` section; one definition serves both.
DEFAULT_SETTINGS: dict[str, Any] = TuningConfig().to_dict()


def resolve_settings(settings: Optional[dict] = None) -> dict[str, Any]:
    """Defaults overlaid with ``settings``; raises :class:`ConfigError` (a ``ValueError``) naming any
    bad key or value, so the CLI reports it in one line."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ConfigError(f"tune setting {unknown[0]!r} is not valid; valid keys: {sorted(DEFAULT_SETTINGS)}")
    s = {**DEFAULT_SETTINGS, **settings}
    s["processes"] = list(dict.fromkeys(s["processes"]))  # de-duplicate, keep order
    for key in ("num_samples", "trial_steps", "eval_every", "eval_samples", "eval_steps", "grace_period", "cpus_per_trial"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise ConfigError(f"tune.{key}: {s[key]!r} must be a positive integer")
    checks = [
        ("eval_samples", s["eval_samples"] >= 2, "needs >= 2 samples for a covariance"),
        ("eval_every", s["eval_every"] <= s["trial_steps"], f"must be <= trial_steps ({s['trial_steps']})"),
        ("grace_period", s["grace_period"] <= s["trial_steps"], f"must be <= trial_steps ({s['trial_steps']})"),
        ("gamma_min", 0 < s["gamma_min"] < s["gamma_max"], f"need 0 < gamma_min < gamma_max ({s['gamma_max']})"),
        ("lr_min", 0 < s["lr_min"] < s["lr_max"], f"need 0 < lr_min < lr_max ({s['lr_max']})"),
        ("processes", bool(s["processes"]) and set(s["processes"]) <= set(PROCESS_CLASSES), f"choose from {list(PROCESS_CLASSES)}"),
        *((f"{p}_sampler", s[f"{p}_sampler"] in c.samplers, f"choose one of {list(c.samplers)}")
          for p, c in PROCESS_CLASSES.items()),
        ("reduction_factor", s["reduction_factor"] > 1, "must be > 1"),
        ("val_fraction", 0 < s["val_fraction"] < 1, "must lie strictly between 0 and 1"),
        ("gpus_per_trial", s["gpus_per_trial"] >= 0, "must be >= 0"),
        ("max_concurrent_trials", s["max_concurrent_trials"] >= 0, "must be >= 0 (0: no limit)"),
        ("fold", s["fold"] >= 0, "must be >= 0"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"tune.{key}: {s[key]!r} is not valid; {why}")
    return s


def validation_split(ids: list[str], labels: np.ndarray, subjects: list[str], fraction: float,
                     seed: int) -> tuple[list[str], list[str]]:
    """Split ``ids`` into (generator-training, validation), stratified by label and grouped by subject
    (:func:`raysynth.data.splits.holdout_split`): a validation slice next to its training neighbour
    would reward memorisation."""
    try:
        train, val = holdout_split(labels, subjects, fraction, seed)
    except InputError as exc:
        raise StageError(f"tune: {exc}; lower tune.val_fraction or add data") from None
    return [ids[i] for i in train], [ids[i] for i in val]


def search_space(s: dict[str, Any]) -> dict[str, Any]:
    """Tune's param_space: gamma and the learning rate on log scales, the process if several."""
    procs = s["processes"]
    return {"gamma": tune.loguniform(s["gamma_min"], s["gamma_max"]),
            "learning_rate": tune.loguniform(s["lr_min"], s["lr_max"]),
            "process": tune.choice(procs) if len(procs) > 1 else procs[0]}


def best_config(cfg: Config, best: dict[str, Any]) -> Config:
    """``cfg`` with the best trial's diffusion values, and a sampler valid for its process."""
    diffusion = trial_diffusion(cfg.diffusion, best)
    sampler = cfg.sampling.sampler
    if sampler not in PROCESS_CLASSES[diffusion.process].samplers:
        sampler = FALLBACK_SAMPLER[diffusion.process]
    return cfg.replace(diffusion=diffusion, sampling=cfg.sampling.replace(sampler=sampler))


class _Progress(tune.Callback):
    """Driver-side: count each finished trial on ``bar`` and log its FD (in the log file)."""

    def __init__(self, total: int, trial_steps: int) -> None:
        self.total, self.trial_steps, self.done, self.best = total, trial_steps, 0, math.inf
        self.bar: Optional[Progress] = None

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        r, c = trial.last_result or {}, trial.config
        step = r.get("step", 0)
        how = "diverged" if r.get("diverged") else "completed" if step >= self.trial_steps else "stopped by ASHA"
        log.debug("tune: trial %d/%d %s at step %d: %s gamma=%s lr=%.2e: fd %.4g (best %.4g)", self.done, self.total,
                  how, step, c["process"], f"{c['gamma']:.3g}" if c["process"] == "gamma" else "-",
                  c["learning_rate"], r.get("fd", float("nan")), r.get("best_fd", float("nan")))
        if self.bar is not None:
            fd = r.get("best_fd", float("nan"))
            self.best = min(self.best, fd) if math.isfinite(fd) else self.best
            self.bar.note(f"last {how} at step {step}" + (f", best FD {self.best:.4g}" if math.isfinite(self.best) else ""))
            self.bar.update()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        log.warning("tune: trial %d/%d failed: %s", self.done, self.total, trial.config)
        if self.bar is not None:
            self.bar.update()


def tune_digest(cfg: Config, s: dict[str, Any]) -> str:
    """The search is stale when the data, splits, the diffusion fields it does not search, the
    encoder (``quality``), the seed or the settings change. The searched fields are left out, so
    running ``tune --config best.yaml`` again finds the search complete."""
    diffusion = {k: v for k, v in cfg.diffusion.to_dict().items() if k not in SEARCHED}
    blob = json.dumps({"v": TUNE_VERSION, "sections": cfg.section_digest("data", "cv", "quality"),
                       "diffusion": diffusion, "seed": cfg.seed, "settings": s}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def search(cfg: Config, layout: Layout, *, settings: Optional[dict] = None, force: bool = False) -> dict[str, Any]:
    """Run the search (or skip it when complete) and return ``tune.json``'s contents.

    ``settings`` default to the config's ``tune`` section.
    """
    if cfg.diffusion.space != "pixel":
        raise StageError("tune: diffusion.space=latent is not supported; the search scores pixel-space generators "
                         "(tune with diffusion.space=pixel, then train in latent space with the best values)")
    if settings is None:
        settings = cfg.tune.to_dict()
    s = resolve_settings(settings)
    digest, out = tune_digest(cfg, s), layout.tune
    if not force and _is_complete(out, digest):
        log.info("tune: %s is up to date (digest %s); skipping", out, digest)
        return read_json(out / TUNE_JSON)
    records, fingerprint, splits = read_prepared(layout, cfg)
    fold = next((f for f in splits if f["fold"] == s["fold"]), None)
    if fold is None:
        raise StageError(f"tune: fold {s['fold']} is not in splits.json ({len(splits)} folds)")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(layout.ray_storage / f"tune_{digest}", ignore_errors=True)
    t_start = time.time()

    # 1. Data: the fold's training part only, split into generator-training and validation parts.
    part = records.subset_ids(fold["train"])
    split_seed = derive_seed(cfg.seed, s["fold"], _SEED_SPLIT)
    gen_ids, val_ids = validation_split(part.ids, part.labels, part.subjects, s["val_fraction"], split_seed)
    gen_ids = generator_train_ids(cfg, {"fold": s["fold"], "train": gen_ids}, dict(zip(part.ids, part.labels.tolist())))
    if set(val_ids) & (set(gen_ids) | set(fold["test"])):  # a bug in the split, never expected
        raise StageError("tune: validation ids overlap the generator-training or test ids")
    gen, val = part.subset_ids(gen_ids), part.subset_ids(val_ids)
    n_mask = mask_classes(cfg, fingerprint)
    x0, labels = training_tensors(gen, n_mask)

    # 2. The encoder, fitted once on the generator-training part, and the real-vs-real scale.
    q, enc_seed = cfg.quality, derive_seed(cfg.seed, s["fold"], _SEED_ENCODER)
    encoder = (train_encoder(gen.images, gen.labels, cfg.data.dims, q.feature_dim, q.encoder_epochs, enc_seed)
               if q.encoder == "trained" else random_encoder(cfg.data.dims, q.feature_dim, enc_seed, in_channels=gen.num_channels))
    encoder.description["validation_accuracy"] = encoder.accuracy(val.images, val.labels)
    val_f = encoder.features(val.images)
    # The validation part's class proportions, so a good generator's FD is not inflated by a class
    # mix the real set does not have.
    counts = largest_remainder({int(c): int(np.sum(val.labels == c)) for c in np.unique(val.labels)}, s["eval_samples"])
    eval_labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in sorted(counts.items())])
    ref_n = min(len(gen), s["eval_samples"])
    ref_idx = np.random.default_rng(split_seed).choice(len(gen), ref_n, replace=False)
    reference_fd = frechet_distance(val_f, encoder.features(gen.images[ref_idx]), covariance=COVARIANCE)
    log.info("tune: fold %d: %d generator-training, %d validation images; real-vs-real FD %.4g; %d trials",
             s["fold"], len(gen), len(val), reference_fd, s["num_samples"])

    # 3. The search: ASHA on FD, trial data through the object store.
    ensure_ray(cfg)
    data = {"cfg": cfg.to_dict(), "settings": s, "x0": x0.numpy(), "labels": labels.numpy(), "encoder": encoder,
            "val_features": val_f, "eval_labels": eval_labels, "num_classes": int(fingerprint["num_classes"]),
            "num_mask_classes": n_mask}
    trainable = tune.with_resources(tune.with_parameters(tune_trial, data=data),
                                    {"cpu": s["cpus_per_trial"], "gpu": s["gpus_per_trial"]})
    progress = _Progress(s["num_samples"], s["trial_steps"])
    asha = ASHAScheduler(time_attr="step", metric="fd", mode="min", max_t=s["trial_steps"],
                         grace_period=s["grace_period"], reduction_factor=s["reduction_factor"])
    tuner = tune.Tuner(
        trainable, param_space=search_space(s),
        tune_config=tune.TuneConfig(scheduler=asha, num_samples=s["num_samples"],
                                    search_alg=BasicVariantGenerator(random_state=derive_seed(cfg.seed, _SEED_SEARCH) % 2**32),
                                    max_concurrent_trials=s["max_concurrent_trials"] or None, reuse_actors=True,
                                    trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
        run_config=tune.RunConfig(name=f"tune_{digest}", storage_path=str(layout.ray_storage), verbose=0,
                                  callbacks=[progress]),
    )
    with Progress("tune", s["num_samples"], "trials") as progress.bar:
        results = tuner.fit()
    rows = [_row(r, s) for r in results]
    ranked = sorted((r for r in rows if math.isfinite(r["best_fd"])), key=lambda r: r["best_fd"])
    if not ranked:
        raise StageError(f"tune: no trial produced a finite FD ({[r['status'] for r in rows]}); see {layout.ray_storage}")
    best = ranked[0]

    # 4. Artifacts; tune.json last, as the mark of a complete stage.
    write_table(pa.Table.from_pylist(rows), out / "results.parquet")
    tuned = best_config(cfg, best)
    write_text(out / "best.yaml",
        f"# raysynth tune {digest}: best of {len(rows)} trials by FD on fold {s['fold']}'s validation part\n"
        f"# {best['process']} gamma={best['gamma']} learning_rate={best['learning_rate']:.4g}: "
        f"FD {best['best_fd']:.4g} (real-vs-real {reference_fd:.4g})\n" + tuned.to_yaml())
    plot_trials(rows, reference_fd, out, {"gamma": (s["gamma_min"], s["gamma_max"]), "learning_rate": (s["lr_min"], s["lr_max"])})
    summary = {
        "version": TUNE_VERSION, "digest": digest, "settings": s,
        "search_space": {"gamma": {"distribution": "loguniform", "low": s["gamma_min"], "high": s["gamma_max"],
                                   "applies_to": "gamma"},
                         "learning_rate": {"distribution": "loguniform", "low": s["lr_min"], "high": s["lr_max"]},
                         "process": {"distribution": "choice" if len(s["processes"]) > 1 else "constant",
                                     "values": s["processes"]}},
        "scheduler": {"name": "ASHA", "metric": "fd", "mode": "min", "time_attr": "step", "max_t": s["trial_steps"],
                      "grace_period": s["grace_period"], "reduction_factor": s["reduction_factor"]},
        "metric": f"Frechet distance ({COVARIANCE} covariance) of encoder features: {s['eval_samples']} samples "
                  f"(class proportions of the validation part) vs the validation part",
        "split": {"fold": s["fold"], "seed": split_seed, "n_generator_train": len(gen_ids), "n_validation": len(val_ids),
                  "validation_class_counts": {str(c): int(n) for c, n in sorted(counts.items())},
                  "generator_train_ids": gen_ids, "validation_ids": val_ids,
                  "disjoint_from_test": not (set(gen_ids) | set(val_ids)) & set(fold["test"])},
        "encoder": encoder.description, "reference_fd": reference_fd,
        "best": {k: best[k] for k in ("trial_id", "process", "gamma", "learning_rate", "best_fd", "best_step", "kid_at_best")},
        "best_config": {"process": tuned.diffusion.process, "gamma": tuned.diffusion.gamma,
                        "learning_rate": tuned.diffusion.learning_rate, "sampler": tuned.sampling.sampler},
        "trials": {status: sum(r["status"] == status for r in rows) for status in sorted({r["status"] for r in rows})},
        "files": list(TUNE_FILES), "seconds": round(time.time() - t_start, 1),
    }
    write_json(out / TUNE_JSON, summary)
    log.info("tune: best %s gamma=%s lr=%.3g: FD %.4g (real-vs-real %.4g); wrote %s", best["process"], best["gamma"],
             best["learning_rate"], best["best_fd"], reference_fd, out)
    return summary


def _row(result, s: dict[str, Any]) -> dict[str, Any]:
    """One results.parquet row: the trial's values, its FD history and how it ended."""
    c, df = result.config, result.metrics_dataframe
    history = [] if df is None or "fd" not in df else [(int(a), float(b)) for a, b in zip(df["step"], df["fd"])]
    finite = [(step, fd) for step, fd in history if math.isfinite(fd)]
    best_step, best_fd = min(finite, key=lambda h: h[1]) if finite else (None, float("nan"))
    steps = history[-1][0] if history else 0
    diverged = bool(df is not None and "diverged" in df and df["diverged"].any())
    kids = {} if df is None or "kid" not in df else dict(zip(df["step"].astype(int), df["kid"].astype(float)))
    status = ("error" if result.error is not None else "diverged" if diverged
              else "completed" if steps >= s["trial_steps"] else "stopped")
    trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("trial_", 1)[-1]
    return {"trial_id": str(trial_id), "process": c["process"],
            # gamma is sampled for every trial but only the gamma process uses it
            "gamma": float(c["gamma"]) if c["process"] == "gamma" else None, "learning_rate": float(c["learning_rate"]),
            "best_fd": best_fd, "best_step": best_step, "kid_at_best": kids.get(best_step),
            "last_fd": history[-1][1] if history else float("nan"), "steps": steps, "status": status,
            "error": None if result.error is None else str(result.error).splitlines()[0][:300],
            "fd_history": json.dumps(history)}


def _is_complete(out, digest: str) -> bool:
    try:
        return read_json(out / TUNE_JSON).get("digest") == digest and all((out / f).is_file() for f in TUNE_FILES)
    except (OSError, ValueError):
        return False


__all__ = ["search", "resolve_settings", "validation_split", "search_space", "best_config", "DEFAULT_SETTINGS"]
