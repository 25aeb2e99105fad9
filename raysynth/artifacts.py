"""Every artifact: where it lives, its file names, its reader, and the digest that says it is current.

```
OUT/prepared/    data.parquet, fingerprint.json, splits.json, subsets.json (scarcity curve)
OUT/autoencoder/fold_k/ checkpoint/, autoencoder.json, train_ids.json, metrics.jsonl   (latent space only)
OUT/ddpm/fold_k/ checkpoint/, config.json, train_ids.json, metrics.jsonl
OUT/synthetic/fold_k/ part-*.parquet, nifti/*.nii.gz, manifest.json, grid_*.png
OUT/quality/     quality.json, dropped.json, figures
OUT/study/       results.parquet, predictions.parquet, study.json, trials/*.json, models/*.pt
OUT/robustness/  corrupted.parquet, external.parquet, external_predictions.parquet, robustness.json
OUT/report/      report.json, report.html, report.md, *.png
OUT/tune/        results.parquet, best.yaml, tune.json, fd_vs_*.png   (optional, before train)
OUT/logs/        ray.log: Ray's output and the details of every command run on OUT (not an artifact)
```

A stage reads another stage's output only through this module: the file names live here, and
each reader checks that what it reads was made from the same inputs (the stage's *digest* of the
config sections it depends on) or says in its docstring why it does not. Writers stay with the
stage that owns the artifact; the one atomic write is :mod:`raysynth.io`.

A scarcity study (``study.real_fractions``) adds one generator and one synthetic set per
(fold, fraction) below 1: ``OUT/ddpm/fold_k_p25`` for 25%, ``OUT/synthetic/fold_k_p25``. The full
training part keeps the plain ``fold_k`` names, so runs without a scarcity curve look as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq

from raysynth.config import Config
from raysynth.data.schema import ImageSet, read_parquet
from raysynth.errors import StageError
from raysynth.io import (  # noqa: F401  (write_json: re-exported for the stages)
    read_json,
    write_json,
)
from raysynth.storage import is_uri, staging_dir

# ---- file names ---------------------------------------------------------------------------------
CHECKPOINT_DIR = "checkpoint"
"""Inside ``OUT/ddpm/fold_k``: the EMA denoiser (``Denoiser.save_pretrained``) used for sampling."""
GENERATOR_META = "config.json"
"""Written last by train: its presence with a matching digest marks a generator complete."""
TRAIN_IDS = "train_ids.json"
AUTOENCODER_META = "autoencoder.json"
"""Written last by the autoencoder stage: fold, fraction, digest, scale factor, latent shape."""
LOSS_HISTORY = "metrics.jsonl"
MANIFEST = "manifest.json"
CURATION = "curation.json"
"""Beside a manifest when ``sampling.curate`` is set: every sample's score and the ids dropped."""
SHARD_RE = re.compile(r"^part-c(?P<c>\d+)-(?P<lo>\d{7})-(?P<hi>\d{7})\.parquet$")
QUALITY_JSON = "quality.json"
DROPPED_JSON = "dropped.json"
NCC_HISTOGRAM = "ncc_hist.png"
QUALITY_VERSION = 1
"""The format of ``quality.json``: a file of another version is redone."""
RESULTS = "results.parquet"
PREDICTIONS = "predictions.parquet"
STUDY_JSON = "study.json"
ROBUSTNESS_JSON = "robustness.json"
ROBUSTNESS_TABLES = ("corrupted", "external", "external_predictions")
REPORT_JSON = "report.json"
TUNE_JSON = "tune.json"
TUNE_FILES = ("results.parquet", "best.yaml", "fd_vs_gamma.png", "fd_vs_lr.png", TUNE_JSON)


@dataclass(frozen=True)
class Layout:
    """``root``: the local folder every stage reads and writes. ``remote``: the URI it mirrors
    when the output is on object storage (``--out s3://...``; see raysynth.storage), else None."""

    root: Path
    remote: Optional[str] = None

    @classmethod
    def at(cls, out: str | os.PathLike) -> "Layout":
        """A local folder, or a URI (``s3://``, ``gs://``, ``file://``...): then ``root`` is its staging folder."""
        if is_uri(out):
            return cls(staging_dir(str(out)), remote=str(out))
        return cls(Path(out).expanduser().resolve())

    @property
    def location(self) -> str:
        """Where the output lives, for messages: the URI, or the local folder."""
        return self.remote or str(self.root)

    # prepare
    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def data_parquet(self) -> Path:
        return self.prepared / "data.parquet"

    @property
    def fingerprint(self) -> Path:
        return self.prepared / "fingerprint.json"

    @property
    def splits(self) -> Path:
        return self.prepared / "splits.json"

    @property
    def subsets(self) -> Path:
        """Nested real-data subsets of every fold's training part, one per real fraction (prepare)."""
        return self.prepared / "subsets.json"

    # autoencoder (latent space)
    def autoencoder(self, fold: int, fraction: float = 1.0) -> Path:
        return self.root / "autoencoder" / f"fold_{fold}{fraction_tag(fraction)}"

    # train
    def ddpm(self, fold: int, fraction: float = 1.0) -> Path:
        return self.root / "ddpm" / f"fold_{fold}{fraction_tag(fraction)}"

    # sample
    def synthetic(self, fold: int, fraction: float = 1.0) -> Path:
        return self.root / "synthetic" / f"fold_{fold}{fraction_tag(fraction)}"

    @property
    def quality(self) -> Path:
        return self.root / "quality"

    @property
    def study(self) -> Path:
        return self.root / "study"

    @property
    def study_trials(self) -> Path:
        return self.study / "trials"

    def study_model(self, key: str) -> Path:
        """The trained downstream network of one study trial (:func:`trial_key`)."""
        return self.study / "models" / f"{key}.pt"

    @property
    def robustness(self) -> Path:
        return self.root / "robustness"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    @property
    def ray_storage(self) -> Path:
        """Ray Train / Tune run folders (checkpoints, trial state)."""
        return self.root / "ray"

    @property
    def logs(self) -> Path:
        """The command line's log files: ``ray.log``, Ray's output and every detail (raysynth.console)."""
        return self.root / "logs"


def fraction_tag(fraction: float) -> str:
    """Folder suffix of a real-data fraction: "" for the whole training part, "_p25" for 25%."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: {fraction} must lie in (0, 1]")
    if fraction == 1.0:
        return ""
    return "_p" + f"{fraction * 100:g}".replace(".", "_")


def fraction_key(fraction: float) -> str:
    """The JSON key of a fraction: "1", "0.25"."""
    return f"{fraction:g}"


# ---- digests: an artifact is current while the digest of its inputs holds -------------------------

def prepared_digest(cfg: Config) -> str:
    return cfg.section_digest("data", "cv")


def autoencoder_digest(cfg: Config, fraction: float = 1.0) -> str:
    """An autoencoder is stale when the data, the splits, its section, its subset, or what picks
    its training images (``diffusion.max_train_images``, the seed) change."""
    blob = json.dumps({"sections": cfg.section_digest("data", "cv", "autoencoder"), "seed": cfg.seed,
                       "max_train_images": cfg.diffusion.max_train_images}, sort_keys=True).encode()
    base = hashlib.sha256(blob).hexdigest()[:16]
    return base if fraction == 1.0 else f"{base}{fraction_tag(fraction)}"


def generator_digest(cfg: Config, fraction: float = 1.0) -> str:
    """A generator is stale when the data, the splits, the diffusion config or its subset change,
    and in latent space when its autoencoder does."""
    base = cfg.section_digest("data", "cv", "diffusion")  # opt-in fields count only when set
    if cfg.diffusion.space == "latent":
        base = hashlib.sha256(f"{base}/{autoencoder_digest(cfg)}".encode()).hexdigest()[:16]
    return base if fraction == 1.0 else f"{base}{fraction_tag(fraction)}"


def sampling_digest(cfg: Config) -> str:
    """What changes the samples themselves. Size fields are excluded on purpose: changing the count
    grows or shrinks a set in place, and curation filters a set without changing it. cpu_bf16 and
    guidance_scale count (only when set: see Config.section_digest)."""
    s = cfg.sampling
    kept = type(s)(sampler=s.sampler, steps=s.steps, seed=s.seed, cpu_bf16=s.cpu_bf16, guidance_scale=s.guidance_scale)
    return Config(diffusion=cfg.diffusion, sampling=kept).section_digest("sampling")


QUALITY_SECTIONS = ("data", "cv", "diffusion", "sampling", "quality")


def _with_autoencoder(cfg: Config, sections: tuple[str, ...]) -> tuple[str, ...]:
    """In latent space the autoencoder shapes every sample, so the stages downstream of it count it."""
    return sections + ("autoencoder",) if cfg.diffusion.space == "latent" else sections


def quality_digest(cfg: Config) -> str:
    return cfg.section_digest(*_with_autoencoder(cfg, QUALITY_SECTIONS))


def study_digest(cfg: Config) -> str:
    return cfg.section_digest(*_with_autoencoder(cfg, ("data", "cv", "diffusion", "sampling", "study", "quality")))


def robustness_digest(cfg: Config, external: Optional[str], external_signature: Optional[str]) -> str:
    """The study's digest, the robustness section and the external data (its source and file signature)."""
    blob = json.dumps({"study": study_digest(cfg), "robustness": cfg.section_digest("robustness"),
                       "external": [external, external_signature]}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---- prepare --------------------------------------------------------------------------------------

def read_prepared(layout: Layout, cfg: Config) -> tuple[ImageSet, dict, list[dict]]:
    """The prepared records, fingerprint and folds, checked to be made from ``cfg``'s ``data`` and
    ``cv`` sections. Raises :class:`StageError` when prepare has not run or is stale."""
    fingerprint = read_fingerprint(layout, cfg)
    return read_parquet(layout.data_parquet), fingerprint, read_splits(layout, cfg)


def read_fingerprint(layout: Layout, cfg: Config) -> dict:
    missing = [p for p in (layout.fingerprint, layout.data_parquet, layout.splits) if not p.is_file()]
    if missing:
        raise StageError(f"prepare has not run: {missing[0]} is missing; run `raysynth prepare` first")
    fingerprint = read_json(layout.fingerprint)
    if fingerprint.get("config_digest") != prepared_digest(cfg):
        raise StageError(f"{layout.prepared} was prepared with another data/cv config "
                         f"(digest {fingerprint.get('config_digest')}); rerun `raysynth prepare`")
    return fingerprint


def prepared_outdated(layout: Layout, cfg: Config, signature: Optional[str]) -> Optional[str]:
    """Why prepare must run (again) for ``cfg``, or None when its output is current: ``"missing"``
    (a file is absent, or the fingerprint unreadable), ``"config"`` (another data/cv digest) or
    ``"source"`` (files under ``data.source`` changed; ``signature``: ``data.sources.source_signature``)."""
    if not all(p.is_file() for p in (layout.fingerprint, layout.data_parquet, layout.splits)):
        return "missing"
    try:
        fingerprint = read_json(layout.fingerprint)
    except (OSError, ValueError):
        return "missing"
    if fingerprint.get("config_digest") != prepared_digest(cfg):
        return "config"
    if fingerprint.get("source_signature") != signature:
        return "source"
    return None


def mask_classes(cfg: Config, fingerprint: dict) -> int:
    """Mask classes a generator draws with its images (background included): the fingerprint's for
    segmentation, 0 for classification (whose masks, if any, do not travel)."""
    return int(fingerprint.get("num_mask_classes") or 0) if cfg.data.task == "segmentation" else 0


def read_splits(layout: Layout, cfg: Config) -> list[dict]:
    """The folds of ``splits.json``; its digest is the fingerprint's (prepare writes both at once)."""
    read_fingerprint(layout, cfg)
    return read_json(layout.splits)["folds"]


def read_subsets(layout: Layout, cfg: Config) -> dict[int, dict[float, list[str]]]:
    """``{fold: {fraction: real training ids}}`` for 1.0 and every ``study.real_fractions``.

    Checked against the splits it refines (same seed, same test parts) and for every fraction the
    config asks for; prepare writes it, so a missing fraction means prepare must run again."""
    folds = read_splits(layout, cfg)
    if not layout.subsets.is_file():
        raise StageError(f"prepare has not written {layout.subsets}; rerun `raysynth prepare`")
    record = read_json(layout.subsets)
    if record.get("seed") != cfg.cv.seed or [f["test"] for f in record.get("folds", [])] != [f["test"] for f in folds]:
        raise StageError(f"{layout.subsets} does not match splits.json; rerun `raysynth prepare`")
    wanted = sorted(set(cfg.study.real_fractions) | {1.0})
    out: dict[int, dict[float, list[str]]] = {}
    for entry in record["folds"]:
        subsets = entry["subsets"]
        lacking = [p for p in wanted if fraction_key(p) not in subsets]
        if lacking:
            raise StageError(f"{layout.subsets} has no subset for real fraction {lacking[0]:g}; rerun `raysynth prepare`")
        out[int(entry["fold"])] = {p: list(subsets[fraction_key(p)]) for p in wanted}
    return out


# ---- autoencoder (latent space) -------------------------------------------------------------------

def autoencoder_complete(cfg: Config, layout: Layout, fold: int, fraction: float = 1.0) -> bool:
    folder = layout.autoencoder(fold, fraction)
    meta = folder / AUTOENCODER_META
    if not meta.is_file() or not (folder / CHECKPOINT_DIR).is_dir():
        return False
    return read_json(meta).get("digest") == autoencoder_digest(cfg, fraction)


def read_autoencoder(layout: Layout, cfg: Config, fold: int, fraction: float = 1.0) -> dict:
    """The meta of the autoencoder of a (fold, fraction), checked to be that fold's and current for
    ``cfg``; ``meta["path"]`` is its exported network. An autoencoder of another fold (it saw that
    fold's test part, which may be this fold's training part, or the reverse) or of another config
    is a :class:`StageError`."""
    folder = layout.autoencoder(fold, fraction)
    path = folder / AUTOENCODER_META
    name = f"{fold}{fraction_tag(fraction)}"
    if not path.is_file() or not (folder / CHECKPOINT_DIR).is_dir():
        raise StageError(f"fold {name} has no trained autoencoder at {folder}; run `raysynth autoencoder` first")
    meta = read_json(path)
    if (meta.get("fold"), meta.get("fraction")) != (fold, fraction):
        raise StageError(f"the autoencoder at {folder} belongs to fold {meta.get('fold')}"
                         f"{fraction_tag(meta.get('fraction') or 1.0)}, not fold {name}; a fold's diffusion model "
                         "uses only its own autoencoder (rerun `raysynth autoencoder --force`)")
    if meta.get("digest") != autoencoder_digest(cfg, fraction):
        raise StageError(f"the autoencoder of fold {name} at {folder} was trained with another data/cv/autoencoder "
                         "config; rerun `raysynth autoencoder`")
    if not meta.get("disjoint", False):
        raise StageError(f"the autoencoder of fold {name} at {folder} trained on test ids; rerun `raysynth autoencoder --force`")
    return {**meta, "path": str(folder / CHECKPOINT_DIR)}


def autoencoder_history(layout: Layout, fold: int, fraction: float = 1.0) -> list[dict]:
    return _jsonl(layout.autoencoder(fold, fraction) / LOSS_HISTORY)


# ---- train ----------------------------------------------------------------------------------------

def generator_complete(cfg: Config, layout: Layout, fold: int, fraction: float = 1.0) -> bool:
    folder = layout.ddpm(fold, fraction)
    meta = folder / GENERATOR_META
    if not meta.is_file() or not (folder / CHECKPOINT_DIR).is_dir():
        return False
    return read_json(meta).get("digest") == generator_digest(cfg, fraction)


def generator_meta(layout: Layout, fold: int, fraction: float = 1.0, cfg: Optional[Config] = None) -> dict:
    """A trained generator's ``config.json``. With ``cfg``, checked to be current for it.

    The sampling actors read it without a config: the driver checked the digest before it sent them."""
    folder = layout.ddpm(fold, fraction)
    path = folder / GENERATOR_META
    name = f"{fold}{fraction_tag(fraction)}"
    if not path.is_file():
        raise StageError(f"fold {name} has no trained generator at {folder}; run `raysynth train` first")
    meta = read_json(path)
    if cfg is not None and meta.get("digest") != generator_digest(cfg, fraction):
        raise StageError(f"the generator of fold {name} at {folder} was trained with another data/cv/diffusion "
                         "config; rerun `raysynth train`")
    return meta


def generator_train_ids(layout: Layout, fold: int, fraction: float = 1.0) -> tuple[list[str], Path]:
    """The real ids a generator trained on, and the file that records them. Not digest-checked:
    ``train_ids.json`` is written with its ``config.json``, which :func:`generator_meta` checks."""
    path = layout.ddpm(fold, fraction) / TRAIN_IDS
    if not path.is_file():
        raise StageError(f"{path} is missing; run `raysynth train`")
    return list(read_json(path)["train_ids"]), path


def loss_history(layout: Layout, fold: int, fraction: float = 1.0) -> list[dict]:
    return _jsonl(layout.ddpm(fold, fraction) / LOSS_HISTORY)


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- sample ---------------------------------------------------------------------------------------

def shard_name(label: int, lo: int, hi: int) -> str:
    return f"part-c{label}-{lo:07d}-{hi:07d}.parquet"


def sample_id(fold: int, label: int, index: int, fraction: float = 1.0) -> str:
    return f"syn-f{fold}{fraction_tag(fraction)}-c{label}-{index:07d}"


def sample_index(sample_id: str) -> int:
    """``syn-f0-c1-0000007`` -> 7: a sample's index within its class."""
    return int(sample_id.rsplit("-", 1)[1])


def existing_shards(folder: Path) -> dict[int, list[tuple[int, int]]]:
    """``{class: [(lo, hi), ...]}`` of the complete shard files in a synthetic folder."""
    found: dict[int, list[tuple[int, int]]] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = SHARD_RE.match(p.name)
            if m:
                found.setdefault(int(m["c"]), []).append((int(m["lo"]), int(m["hi"])))
    return found


def read_manifest(layout: Layout, fold: int, fraction: float = 1.0, cfg: Optional[Config] = None) -> Optional[dict]:
    """A synthetic set's manifest, or None when it has none. With ``cfg``, a manifest made with
    another sampling config or from another generator is an error."""
    path = layout.synthetic(fold, fraction) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json(path)
    if cfg is not None:
        name = f"{fold}{fraction_tag(fraction)}"
        if manifest.get("sampling_digest") != sampling_digest(cfg):
            raise StageError(f"the synthetic set of fold {name} was sampled with another sampling config; "
                             "rerun `raysynth sample`")
        meta = generator_meta(layout, fold, fraction, cfg)
        if manifest.get("generator_id") != meta["generator_id"]:
            raise StageError(f"the synthetic set of fold {name} comes from an older generator; rerun `raysynth sample`")
    return manifest


def curation_digest(cfg: Config, manifest: dict) -> str:
    """What a curation record depends on: the set (its generator, sampling config and sample
    checksums), the curation settings, and the study network the curator is."""
    st = cfg.study
    blob = json.dumps({
        "generator": manifest.get("generator_id"), "sampling": manifest.get("sampling_digest"),
        "samples": hashlib.sha256("".join(str(s.get("checksum")) for s in manifest.get("samples", [])).encode()).hexdigest(),
        "curate": cfg.sampling.curate.model_dump() if cfg.sampling.curate else None,
        "network": [st.epochs, st.batch_size, st.lr_for(cfg.data.task), st.width], "seed": cfg.seed,
    }, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_curation(layout: Layout, fold: int, fraction: float = 1.0, cfg: Optional[Config] = None) -> Optional[dict]:
    """The (fold, fraction)'s ``curation.json``, or None when it has none. With ``cfg`` (which sets
    ``sampling.curate``), one made for another set or config is an error."""
    path = layout.synthetic(fold, fraction) / CURATION
    if not path.is_file():
        if cfg is not None and cfg.sampling.curate is not None:
            raise StageError(f"the synthetic set of fold {fold}{fraction_tag(fraction)} is not curated; "
                             "rerun `raysynth sample`")
        return None
    record = read_json(path)
    if cfg is not None:
        manifest = read_manifest(layout, fold, fraction)
        if manifest is None or record.get("digest") != curation_digest(cfg, manifest):
            raise StageError(f"the curation of fold {fold}{fraction_tag(fraction)} was made for another set or "
                             "config; rerun `raysynth sample`")
    return record


def read_synthetic(layout: Layout, fold: int, exclude: Optional[set[str]] = None, fraction: float = 1.0,
                   cfg: Optional[Config] = None) -> Optional[ImageSet]:
    """The (fold, fraction)'s synthetic set as listed in its manifest, minus ``exclude`` ids (None if empty).
    With ``cfg``, checked as in :func:`read_manifest`, and when it sets ``sampling.curate`` the
    samples curation dropped are left out too."""
    folder = layout.synthetic(fold, fraction)
    manifest = read_manifest(layout, fold, fraction, cfg)
    if manifest is None:
        raise StageError(f"no synthetic data for fold {fold}{fraction_tag(fraction)} at {folder}; "
                         "run `raysynth sample` first")
    if not manifest["shards"]:
        return None
    curated = read_curation(layout, fold, fraction, cfg) if cfg is not None and cfg.sampling.curate else None
    exclude = (exclude or set()) | set(curated["dropped"] if curated else [])
    data = read_parquet([folder / s for s in manifest["shards"]])
    wanted = {s["id"] for s in manifest["samples"]} - exclude
    keep = [i for i, sid in enumerate(data.ids) if sid in wanted]
    return data.select(keep) if keep else None


# ---- quality --------------------------------------------------------------------------------------

def read_quality(layout: Layout) -> Optional[dict]:
    """``quality.json``, or None when the stage has not run. Not digest-checked: the report shows
    it with the digest it records, and the pipeline reads the summary the stage returned."""
    path = layout.quality / QUALITY_JSON
    return read_json(path) if path.is_file() else None


def quality_outdated(layout: Layout, cfg: Config, folds: list[int]) -> Optional[str]:
    """Why quality must run (again) for ``cfg`` and the synthetic sets of ``folds``, or None when
    ``quality.json`` is complete: ``"missing"`` (absent or unreadable), ``"config"`` (another digest,
    seed or :data:`QUALITY_VERSION`), ``"folds"`` (it assessed other folds) or ``"figures"`` (a
    figure, or the drop list ``quality.drop_memorised`` asks for, is missing)."""
    try:
        saved = read_json(layout.quality / QUALITY_JSON)
    except (OSError, ValueError):
        return "missing"
    if (saved.get("version"), saved.get("config_digest"), saved.get("seed")) != (QUALITY_VERSION, quality_digest(cfg),
                                                                                 cfg.seed):
        return "config"
    try:
        if sorted(r["fold"] for r in saved["folds"]) != sorted(folds):
            return "folds"
        names = [NCC_HISTOGRAM] + [r["figures"]["nearest_pairs"] for r in saved["folds"]]
    except (KeyError, TypeError):
        return "missing"
    names += [DROPPED_JSON] if cfg.quality.drop_memorised else []
    return None if all((layout.quality / n).is_file() for n in names) else "figures"


def dropped_ids(layout: Layout, cfg: Config) -> set[str]:
    """Synthetic ids the privacy gate removed (``quality.drop_memorised``), for this config."""
    path = layout.quality / DROPPED_JSON
    if not cfg.quality.drop_memorised or not path.is_file():
        return set()
    record = read_json(path)
    if record.get("config_digest") != quality_digest(cfg):
        raise StageError(f"{path} was written for another config; rerun `raysynth quality`")
    return {i for per_fold in record["ids"].values() for i in per_fold}


# ---- study ----------------------------------------------------------------------------------------

TRIAL_FIELDS = ("arm", "ratio", "fraction", "fold", "seed")


def trial_key(arm: str, ratio: Optional[float], fraction: float, fold: int, seed: int) -> str:
    """A file- and directory-safe name of one trial: ``synthetic-x2_p25_f0_s1``."""
    condition = arm if ratio is None else f"{arm}-x{ratio:g}"
    return f"{condition.replace('+', '-plus-')}{fraction_tag(fraction)}_f{fold}_s{seed}"


def finished_trials(cfg: Config, layout: Layout) -> list[dict]:
    """The trial files of this config's study (its digest), each with ``real_fraction`` and the
    split's CV ``repeat`` added: the rows both ``results.parquet`` and the robustness stage key on."""
    folder = layout.study_trials
    digest = study_digest(cfg)
    trials = [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    trials = [t for t in trials if t.get("digest") == digest]
    if not trials:
        return []
    repeat_of = {int(s["fold"]): int(s.get("repeat", 0)) for s in read_splits(layout, cfg)}
    return [{**t, "real_fraction": float(t["fraction"]), "repeat": repeat_of.get(int(t["fold"]), 0)} for t in trials]


def load_results(layout: Layout, cfg: Config) -> list[dict[str, Any]]:
    """``results.parquet`` rows, checked against ``study.json``'s digest."""
    path = layout.study / RESULTS
    if not path.is_file():
        raise StageError(f"no study results at {path}; run `raysynth study` first")
    meta = layout.study / STUDY_JSON
    if not meta.is_file() or read_json(meta).get("digest") != study_digest(cfg):
        raise StageError(f"{path} was made with another config; rerun `raysynth study`")
    return pq.read_table(path).to_pylist()


def load_predictions(layout: Layout) -> Optional[list[dict[str, Any]]]:
    """``predictions.parquet`` rows (classification), or None. Written with ``results.parquet`` in
    one stage run, whose digest :func:`load_results` checks."""
    path = layout.study / PREDICTIONS
    return pq.read_table(path).to_pylist() if path.is_file() else None


# ---- robustness -----------------------------------------------------------------------------------

def read_robustness(layout: Layout) -> Optional[dict]:
    """``robustness.json``, or None. Its ``digest`` is compared by the report with the study's."""
    path = layout.robustness / ROBUSTNESS_JSON
    return read_json(path) if path.is_file() else None


def load_table(layout: Layout, name: str) -> Optional[list[dict]]:
    """Rows of ``OUT/robustness/<name>.parquet`` or None when the stage has not written it (written
    with ``robustness.json``, whose digest the report checks)."""
    if name not in ROBUSTNESS_TABLES:
        raise ValueError(f"robustness table {name!r} is not one of {list(ROBUSTNESS_TABLES)}")
    path = layout.robustness / f"{name}.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else None


# ---- report ---------------------------------------------------------------------------------------

def report_inputs_sha256(layout: Layout) -> str:
    """Hash of the study's results and the robustness stage's tables: report.json is current
    while the ``results_sha256`` it records matches."""
    h = hashlib.sha256()
    for path in (layout.study / RESULTS, layout.robustness / ROBUSTNESS_JSON,
                 layout.robustness / "corrupted.parquet", layout.robustness / "external.parquet"):
        if path.is_file():
            h.update(path.name.encode() + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def report_outdated(layout: Layout) -> Optional[str]:
    """Why report.json must be built (again), or None when it is current: ``"missing"``, or
    ``"inputs"`` (the study's results or the robustness tables changed since). Without study
    results on file, an existing report.json is current: it is only re-rendered."""
    path = layout.report / REPORT_JSON
    if not path.is_file():
        return "missing"
    if (layout.study / RESULTS).is_file() and read_json(path).get("results_sha256") != report_inputs_sha256(layout):
        return "inputs"
    return None
