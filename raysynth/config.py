"""One typed config tree for every stage, with presets, YAML in and out, and strict overrides.

Every stage reads the same :class:`Config`. It is built from a preset, then a YAML file, then
``--set key.sub=value`` overrides, in that order. Unknown keys and wrong types are rejected with
the dotted path of the bad key, and option strings list the valid choices (diffusers style).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


OPT_IN_FIELDS = ("diffusion.cpu_bf16", "sampling.cpu_bf16")
"""Boolean settings added after artifacts existed: they enter a digest only when set."""


class ConfigError(ValueError):
    """A config value, key or file is invalid. The message names the dotted key path."""


Dims = Literal[2, 3]
Task = Literal["classification", "segmentation"]
Process = Literal["ddpm", "gamma"]
Sampler = Literal["ddpm", "ddim", "dpmsolver++", "euler", "heun"]
Denoise = Literal["none", "gaussian", "median"]
BadFilePolicy = Literal["error", "skip"]
Encoder = Literal["trained", "random"]
ClassBalance = Literal["balanced", "proportional"]
CorruptionName = Literal["noise", "bias", "ghosting", "spike", "gibbs", "blur", "contrast"]


@dataclass
class DataConfig:
    """Where the real scans come from and how they are preprocessed."""

    source: Optional[str] = None
    """A class-folder image set, or a NIfTI folder with labels.csv. None: the embedded cohort."""
    dims: Dims = 2
    task: Task = "classification"
    image_size: int = 32
    """Side of 2D images, and of 3D volumes (a cube), in voxels after preprocessing."""
    num_scans: int = 557
    """Size of the embedded cohort (the paper's public set has 557 scans of one subject)."""
    lesion_fraction: float = 0.5
    """Fraction of embedded scans that carry a simulated focal lesion (label 1)."""
    cohort_seed: int = 0
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    denoise: Denoise = "none"
    denoise_sigma: float = 0.6
    slices_per_volume: int = 1
    """2D from NIfTI: how many axial slices around the centre to take from each volume."""
    mask_suffix: str = "_seg"
    """Segmentation from NIfTI: the mask of ``x.nii.gz`` is ``x{mask_suffix}.nii.gz``."""
    foreground_crop: bool = False
    bad_files: BadFilePolicy = "error"
    """``error``: the first unreadable input stops the stage. ``skip``: warn and leave it out."""


@dataclass
class CVConfig:
    """Cross-validation splits, written once to splits.json and read by every arm and seed."""

    folds: int = 4
    repeats: int = 1
    seed: int = 0


@dataclass
class DiffusionConfig:
    """The generator: noise process, denoiser size and its Ray Train fit."""

    process: Process = "ddpm"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    gamma: float = 12.5
    """Diffusion constant of the paper's process X_t = X + sqrt(2*gamma*t)*eps (sigma_max = sqrt(2*gamma))."""
    sigma_min: float = 0.002
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention: bool = False
    """Self-attention at the lowest resolution."""
    gradient_checkpointing: bool = False
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    train_steps: int = 1200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    max_train_images: Optional[int] = 350
    """Cap on the real images a generator trains on (the paper used 350). None: the whole fold."""
    num_workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False
    checkpoint_every: int = 500
    max_failures: int = 2
    parallel_folds: bool = True
    max_parallel_folds: Optional[int] = None
    """Folds training at once; None: as many as the cluster's current CPUs/GPUs hold. On an
    autoscaling cluster that starts from zero GPU nodes, set it to the number of GPU nodes wanted."""
    log_every: int = 50
    cpu_bf16: bool = False
    """CPU workers only: the training forward under bf16 autocast (about 1.5x faster where the CPU
    has AVX512-BF16 or AMX; slower where it has neither). Part of the generator's digest."""


@dataclass
class SamplingConfig:
    """Ray Data fan-out of sample requests to model-holding actors."""

    sampler: Sampler = "ddim"
    steps: int = 25
    ratio: float = 1.0
    """Synthetic samples per real training sample of each class (``balanced``: of the largest class)."""
    num_samples: Optional[int] = None
    """Total synthetic samples per fold; overrides ``ratio`` when set."""
    class_balance: ClassBalance = "balanced"
    batch_size: int = 32
    shard_size: int = 128
    min_actors: int = 1
    max_actors: int = 2
    cpus_per_actor: int = 1
    gpus_per_actor: float = 0.0
    seed: int = 1234
    write_nifti: bool = True
    """3D only: also write one .nii.gz per sample (2D writes Parquet only)."""
    cpu_bf16: bool = False
    """CPU actors only: the denoiser under bf16 autocast (about 2x faster where the CPU has
    AVX512-BF16 or AMX). Samples move slightly from fp32 ones, so it is part of the sampling digest."""


@dataclass
class StudyConfig:
    """The Ray Tune grid of downstream CNNs: arm (x ratio) x real fraction x fold x seed."""

    # Unannotated, so a class constant and not a config key.
    ARMS = {
        "baseline": "real training data only",
        "classical": "real data with classical MRI augmentation (flips, affine, elastic, bias field, noise, gamma)",
        "synthetic": "real data plus synthetic data at each ratio",
        "synthetic+classical": "real plus synthetic data at each ratio, with classical augmentation",
        "synthetic_only": "synthetic data only at each ratio (tested on real data)",
    }
    """Valid arm names and what each trains on; every arm uses the same splits and seeds."""

    arms: list[str] = field(default_factory=lambda: ["baseline", "synthetic"])
    ratios: Optional[list[float]] = None
    """Synthetic per real training sample of each class, one arm per ratio for every synthetic arm.
    None: ``[sampling.ratio]``. Samples are drawn once at the largest ratio; smaller ratios take
    the first samples of each class, so their sets are nested."""
    real_fractions: list[float] = field(default_factory=lambda: [1.0])
    """Scarcity curve: fractions of each fold's real training part (nested stratified subsets);
    synthetic arms get one generator per (fold, fraction), trained on that subset only."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    epochs: int = 15
    batch_size: int = 32
    learning_rate: Optional[float] = None
    """None: the task's default (1e-3 for classification; 1e-2 for segmentation, whose Dice+CE
    UNet barely moves at 1e-3 in a short schedule)."""
    width: int = 16
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    primary_metric: str = "balanced_accuracy"

    def lr_for(self, task: str) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-2 if task == "segmentation" else 1e-3

    def ratios_for(self, sampling_ratio: float) -> list[float]:
        return list(self.ratios) if self.ratios is not None else [float(sampling_ratio)]


@dataclass
class QualityConfig:
    """Fidelity, coverage, diversity and the memorisation gate."""

    encoder: Encoder = "trained"
    encoder_epochs: int = 10
    feature_dim: int = 64
    knn: int = 3
    ncc_threshold: float = 0.95
    reference_quantile: Optional[float] = 0.995
    """Raise the NCC threshold to this quantile of held-out real scans' nearest-training NCC; the
    gate then allows ``max_memorised_fraction`` above the held-out scans' own rate over it.

    Scans of one subject (the embedded cohort, the paper's data) are all alike: distinct real scans
    reach NCC 0.96-0.98 with each other, so a fixed 0.95 would flag every faithful sample. A
    synthetic sample is a near-copy when it is closer to a training image than genuinely new real
    scans are. None: use ``ncc_threshold`` alone."""
    max_memorised_fraction: float = 0.01
    """Largest allowed excess of near-copies over held-out real scans' rate (with a reference)."""
    drop_memorised: bool = False


@dataclass
class RobustnessConfig:
    """Generalisation and robustness of the study's trained models, evaluated without retraining."""

    corruptions: list[CorruptionName] = field(
        default_factory=lambda: ["noise", "bias", "ghosting", "spike", "gibbs", "blur", "contrast"])
    """MRI artefacts applied to each split's real test part (``study.augment.CORRUPTIONS``)."""
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    seed: int = 0
    """Seed of the corruption draws; every arm and seed of a split sees the same corrupted images."""
    external_test: Optional[str] = None
    """A second dataset in any supported form (class folders, NIfTI + labels.csv), preprocessed
    like the main data and never seen by a generator or used for model selection."""
    builtin_external: bool = True
    """With the embedded cohort and no ``external_test``: use the cohort as seen by another
    simulated scanner (contrast, noise, resolution, bias) as the external test set."""
    external_scans: int = 200
    """Size of the built-in external set."""
    label_map: dict[str, str] = field(default_factory=dict)
    """External class name -> training class name, for names that differ; the others must match."""
    calibration_bins: int = 10


@dataclass
class TuningConfig:
    """``raysynth tune``: a Ray Tune search over diffusion.gamma and learning rate (and process),
    scored on the Fréchet distance of samples to held-out real images, never on the loss (losses
    at different gammas live on different noise scales)."""

    num_samples: int = 8
    """Trials."""
    trial_steps: int = 400
    """Optimiser steps of a trial that ASHA never stops."""
    eval_every: int = 100
    """Steps between FD evaluations (each one is an ASHA report)."""
    eval_samples: int = 64
    eval_steps: int = 10
    ddpm_sampler: Literal["ddpm", "ddim", "dpmsolver++"] = "ddim"
    gamma_sampler: Literal["euler", "heun"] = "heun"
    gamma_min: float = 2.0
    """sigma_max = sqrt(2 gamma) from 2 ..."""
    gamma_max: float = 2000.0
    """... to 63 (EDM's sigma_max = 80 is gamma = 3200)."""
    lr_min: float = 3e-5
    lr_max: float = 3e-3
    processes: list[Process] = field(default_factory=lambda: ["gamma"])
    grace_period: int = 100
    """Steps before ASHA may stop a trial."""
    reduction_factor: float = 2.0
    val_fraction: float = 0.2
    """Share of the tuning fold's training part held out to score FD (its test part is never used)."""
    fold: int = 0
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    """Fractional on a GPU cluster, e.g. 0.25."""
    max_concurrent_trials: int = 0
    """0: as many as the resources allow."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """None: join RAY_ADDRESS if set, else start a local instance."""
    num_cpus: Optional[int] = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    tune: TuningConfig = field(default_factory=TuningConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """A short stable hash of the whole config (recorded in manifests for provenance)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def section_digest(self, *sections: str) -> str:
        """Hash of selected sections: a stage's artifacts are valid while its inputs' hash holds.

        Fields of :data:`OPT_IN_FIELDS` count only when set: a run that leaves them off keeps the
        digest it had before they existed (its artifacts stay up to date), one that sets them
        gets a new digest."""
        plain = {s: _to_plain(getattr(self, s)) for s in sections}
        for dotted in OPT_IN_FIELDS:
            section, name = dotted.split(".")
            if isinstance(plain.get(section), dict) and not plain[section].get(name, True):
                del plain[section][name]
        blob = json.dumps(plain, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self) -> "Config":
        """Cross-field checks that a type alone cannot express."""
        d, cv, df, s, st = self.data, self.cv, self.diffusion, self.sampling, self.study
        _positive("data.image_size", d.image_size, minimum=8)
        if d.image_size % 4:
            raise ConfigError(f"data.image_size: {d.image_size} must be a multiple of 4 (the denoiser halves it twice)")
        _positive("data.num_scans", d.num_scans, minimum=4)
        if not 0.0 < d.lesion_fraction < 1.0:
            raise ConfigError(f"data.lesion_fraction: {d.lesion_fraction} must lie strictly between 0 and 1")
        if not 0.0 <= d.low_percentile < d.high_percentile <= 100.0:
            raise ConfigError(
                f"data.low_percentile/high_percentile: need 0 <= low < high <= 100, got {d.low_percentile}, {d.high_percentile}"
            )
        _positive("data.slices_per_volume", d.slices_per_volume)
        _positive("cv.folds", cv.folds, minimum=2)
        _positive("cv.repeats", cv.repeats)
        _positive("diffusion.num_train_timesteps", df.num_train_timesteps, minimum=2)
        if not 0.0 < df.beta_start < df.beta_end < 1.0:
            raise ConfigError(f"diffusion.beta_start/beta_end: need 0 < start < end < 1, got {df.beta_start}, {df.beta_end}")
        if df.gamma <= 0:
            raise ConfigError(f"diffusion.gamma: {df.gamma} must be > 0")
        if not df.channels or any(c <= 0 for c in df.channels):
            raise ConfigError(f"diffusion.channels: {df.channels} must be a non-empty list of positive widths")
        _positive("diffusion.batch_size", df.batch_size)
        _positive("diffusion.train_steps", df.train_steps)
        _positive("diffusion.num_workers", df.num_workers)
        _positive("diffusion.checkpoint_every", df.checkpoint_every)
        if not 0.0 <= df.ema_decay < 1.0:
            raise ConfigError(f"diffusion.ema_decay: {df.ema_decay} must lie in [0, 1)")
        if df.max_train_images is not None:
            _positive("diffusion.max_train_images", df.max_train_images, minimum=2)
        valid_samplers = {"ddpm": ("ddpm", "ddim", "dpmsolver++"), "gamma": ("euler", "heun")}[df.process]
        if s.sampler not in valid_samplers:
            raise ConfigError(
                f"sampling.sampler: {s.sampler!r} does not fit diffusion.process={df.process!r}; choose one of {list(valid_samplers)}"
            )
        _positive("sampling.steps", s.steps)
        if s.ratio < 0:
            raise ConfigError(f"sampling.ratio: {s.ratio} must be >= 0")
        if s.num_samples is not None and s.num_samples < 0:
            raise ConfigError(f"sampling.num_samples: {s.num_samples} must be >= 0")
        _positive("sampling.batch_size", s.batch_size)
        _positive("sampling.shard_size", s.shard_size)
        _positive("sampling.min_actors", s.min_actors)
        if s.max_actors < s.min_actors:
            raise ConfigError(f"sampling.max_actors: {s.max_actors} is below sampling.min_actors ({s.min_actors})")
        if not st.arms:
            raise ConfigError("study.arms: at least one arm is needed")
        for arm in st.arms:
            if arm not in StudyConfig.ARMS:
                raise ConfigError(f"study.arms: {arm!r} is not valid; choose from {list(StudyConfig.ARMS)}")
        if len(set(st.arms)) != len(st.arms):
            raise ConfigError(f"study.arms: {st.arms} lists an arm twice")
        if st.ratios is not None and (not st.ratios or any(r <= 0 for r in st.ratios) or len(set(st.ratios)) != len(st.ratios)):
            raise ConfigError(f"study.ratios: {st.ratios} must be distinct numbers > 0 (or null for [sampling.ratio])")
        if st.ratios is None and s.ratio <= 0 and any(a.startswith("synthetic") for a in st.arms):
            raise ConfigError("study.ratios: synthetic arms need a ratio > 0; set study.ratios or sampling.ratio")
        if not st.real_fractions or any(not 0.0 < p <= 1.0 for p in st.real_fractions) \
                or len(set(st.real_fractions)) != len(st.real_fractions):
            raise ConfigError(f"study.real_fractions: {st.real_fractions} must be distinct fractions in (0, 1]")
        if not st.seeds:
            raise ConfigError("study.seeds: at least one seed is needed")
        _positive("study.epochs", st.epochs)
        _positive("study.batch_size", st.batch_size)
        rb = self.robustness
        if any(not 1 <= v <= 5 for v in rb.severities) or len(set(rb.severities)) != len(rb.severities):
            raise ConfigError(f"robustness.severities: {rb.severities} must be distinct integers in 1..5")
        if len(set(rb.corruptions)) != len(rb.corruptions):
            raise ConfigError(f"robustness.corruptions: {rb.corruptions} lists a corruption twice")
        _positive("robustness.external_scans", rb.external_scans, minimum=4)
        _positive("robustness.calibration_bins", rb.calibration_bins, minimum=2)
        rq = self.quality.reference_quantile
        if rq is not None and not 0.0 < rq <= 1.0:
            raise ConfigError(f"quality.reference_quantile: {rq} must lie in (0, 1] or be null")
        if not 0.0 < self.quality.ncc_threshold <= 1.0:
            raise ConfigError(f"quality.ncc_threshold: {self.quality.ncc_threshold} must lie in (0, 1]")
        return self


def _positive(key: str, value: int | float, minimum: int | float = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: {value} must be >= {minimum}")


# ---- presets ---------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: end to end in well under 3 minutes on 2 cores.
    "smoke": {
        "data": {"image_size": 16, "num_scans": 48},
        "cv": {"folds": 2},
        "diffusion": {"channels": [16, 32], "train_steps": 30, "batch_size": 16, "checkpoint_every": 15, "max_train_images": None,
                      "log_every": 10},
        "sampling": {"steps": 5, "ratio": 0.5, "batch_size": 32, "shard_size": 32, "max_actors": 1},
        "study": {"seeds": [0], "epochs": 2, "width": 8},
        "quality": {"encoder_epochs": 2, "feature_dim": 16},
        "robustness": {"severities": [1, 3, 5], "external_scans": 24},
        "tune": {"num_samples": 3, "trial_steps": 20, "eval_every": 10, "grace_period": 10, "eval_samples": 16,
                 "eval_steps": 4},
    },
    # The README's main command (the dataclass defaults): 557 scans at 32x32, 4 folds, a
    # 1200-step generator per fold on at most 350 scans (as in the paper); ~20 minutes on 2 cores.
    "default": {},
    # A cloud GPU cluster: bigger images and networks, GPU workers and actors. DDIM, not DPM-Solver++:
    # on our trained DDPMs DPM-Solver++ gave per-sample brightness drift and worse FD (BENCHMARKS.md).
    "gpu": {
        "data": {"image_size": 128},
        "cv": {"folds": 5},
        "diffusion": {"channels": [64, 128, 256, 256], "layers_per_block": 2, "attention": True,
                      "train_steps": 30000, "batch_size": 64, "use_gpu": True, "num_workers": 4,
                      "checkpoint_every": 2000, "learning_rate": 1e-4, "ema_decay": 0.9999},
        "sampling": {"batch_size": 256, "max_actors": 8, "gpus_per_actor": 1.0, "steps": 50,
                     "sampler": "ddim"},
        "study": {"seeds": [0, 1, 2], "epochs": 40, "width": 32, "gpus_per_trial": 0.25},
        "quality": {"encoder_epochs": 30, "feature_dim": 128},
        "tune": {"num_samples": 32, "trial_steps": 5000, "eval_every": 500, "grace_period": 1000,
                 "reduction_factor": 3.0, "eval_samples": 512, "eval_steps": 20, "processes": ["ddpm", "gamma"],
                 "cpus_per_trial": 2, "gpus_per_trial": 0.25},
    },
}


def preset_names() -> list[str]:
    return list(PRESETS)


def load_config(
    preset: str = "default",
    file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Preset, then YAML file, then ``key.sub=value`` overrides; validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {preset_names()}")
    cfg = from_dict(_deep_merge({}, PRESETS[preset]))
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        cfg = from_dict(_deep_merge(cfg.to_dict(), loaded))
    for item in overrides:
        cfg = apply_override(cfg, item)
    return cfg.validate()


def apply_override(cfg: Config, item: str) -> Config:
    """Apply one ``key.sub=value`` override; the value is parsed as YAML (``[32, 64]``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    tree = cfg.to_dict()
    node = tree
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: unknown config section")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"{key}: unknown config key; valid keys here: {sorted(node)}")
    node[parts[-1]] = value
    return from_dict(tree)


def from_dict(raw: dict[str, Any]) -> Config:
    return _build(Config, raw, "")


def section_from_dict(cls: type, raw: dict[str, Any], path: str = "") -> Any:
    """Rebuild one config section (e.g. the DiffusionConfig saved beside a checkpoint), type-checked."""
    return _build(cls, raw, path)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _to_plain(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown config key; valid keys here: {sorted(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not valid; choose one of {list(args)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(args[0], k, f"{path} key {k!r}"): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "5e-4" (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")  # pragma: no cover - a programming error
