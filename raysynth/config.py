"""The config schema: one typed, validated tree (pydantic v2) that every stage reads.

A :class:`Config` is built from a preset (:mod:`raysynth.presets`), then a YAML file, then
``--set key.sub=value`` overrides, in that order, and validated once at construction: types
(strict: a string is not an int), ranges (next to each field) and cross-field rules (model
validators). Every failure is one :class:`ConfigError` line that names the dotted key path, and
option strings list the valid choices (diffusers style).
"""

import hashlib
import json
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import annotated_types
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from raysynth.presets import PRESETS, preset_names

__all__ = [
    "OPT_IN_FIELDS", "ConfigError", "Dims", "Task", "Process", "Sampler", "Denoise", "BadFilePolicy", "Encoder",
    "ClassBalance", "CorruptionName", "DataConfig", "CVConfig", "DiffusionConfig", "SamplingConfig", "StudyConfig",
    "CurateConfig", "AutoencoderConfig", "QualityConfig", "RobustnessConfig", "TuningConfig", "RayConfig", "Config", "PRESETS", "preset_names",
    "load_config", "apply_override", "from_dict", "section_from_dict",
]

OPT_IN_FIELDS: dict[str, Any] = {
    "diffusion.cpu_bf16": False, "sampling.cpu_bf16": False,
    "diffusion.prediction_type": "epsilon", "diffusion.zero_terminal_snr": False, "diffusion.snr_gamma": None,
    "diffusion.class_dropout": 0.0, "diffusion.flow_timesteps": "logit_normal", "sampling.guidance_scale": 1.0,
    "tune.flow_sampler": "euler", "sampling.curate": None, "diffusion.space": "pixel",
}
"""Settings added after artifacts existed, with their defaults: a field enters a digest only when it
differs from its default, so artifacts made before it existed stay current."""


class ConfigError(ValueError):
    """A config value, key or file is invalid. The message names the dotted key path."""


Dims = Literal[2, 3]
Task = Literal["classification", "segmentation"]
Process = Literal["ddpm", "gamma", "flow"]
Space = Literal["pixel", "latent"]
Prediction = Literal["epsilon", "v_prediction", "sample"]
FlowTimesteps = Literal["logit_normal", "uniform"]
Sampler = Literal["ddpm", "ddim", "dpmsolver++", "euler", "heun"]
Denoise = Literal["none", "gaussian", "median"]
BadFilePolicy = Literal["error", "skip"]
DuplicatePolicy = Literal["group", "drop", "keep"]
Encoder = Literal["trained", "random"]
ClassBalance = Literal["balanced", "proportional"]
CorruptionName = Literal["noise", "bias", "ghosting", "spike", "gibbs", "blur", "contrast"]

SAMPLERS: dict[str, tuple[str, ...]] = {
    "ddpm": ("ddpm", "ddim", "dpmsolver++"), "gamma": ("euler", "heun"), "flow": ("euler", "heun")}
"""The samplers that fit each noise process (``raysynth.diffusion.process``)."""


def _number_from_text(value: Any) -> Any:
    # YAML 1.1 reads "5e-4" (no dot) as a string; accept what Python reads as a number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _list_from_tuple(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


_Float = Annotated[float, BeforeValidator(_number_from_text)]
"""A float field: takes ints (stored as floats) and numeric strings, never bools."""


def _list(item: Any) -> Any:
    return Annotated[list[item], BeforeValidator(_list_from_tuple)]


_UNSET = object()


class _Rule(ValueError):
    """A failed cross-field rule; ``key`` is relative to the model that raised it."""

    def __init__(self, key: str, text: str) -> None:
        super().__init__(text)
        self.key, self.text = key, text


def _distinct(values: list) -> bool:
    return len(set(values)) == len(values)


class _ConfigErrors(type(BaseModel)):
    """``DataConfig(dims=4)`` raises a :class:`ConfigError`, not pydantic's ValidationError. (A
    metaclass, not ``__init__``: pydantic would call a custom ``__init__`` for every nested section.)"""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as exc:
            raise _config_error(exc, cls, _SECTION_OF.get(cls, "")) from None


class _Model(BaseModel, metaclass=_ConfigErrors):
    """Strict, closed (unknown keys are errors), validated on construction and on assignment."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, use_attribute_docstrings=True)

    def __setattr__(self, name: str, value: Any) -> None:
        before = self.__dict__.get(name, _UNSET)
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            if before is not _UNSET:  # a model rule fails after pydantic has stored the value
                self.__dict__[name] = before
            raise _config_error(exc, type(self), _SECTION_OF.get(type(self), "")) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, ints, floats, strings, None): what YAML and the digests see."""
        return self.model_dump()

    def replace(self, **changes: Any) -> Any:
        """A validated copy with ``changes`` (``dataclasses.replace`` for config models;
        ``model_copy(update=...)`` would skip validation)."""
        return _validate(type(self), {**self.model_dump(), **changes}, _SECTION_OF.get(type(self), ""))


class DataConfig(_Model):
    """Where the real scans come from and how they are preprocessed."""

    source: Optional[str] = None
    """A class-folder image set, or a NIfTI folder with labels.csv. None: the embedded cohort."""
    dims: Dims = 2
    task: Task = "classification"
    image_size: int = Field(32, ge=8)
    """Side of 2D images, and of 3D volumes (a cube), in voxels after preprocessing."""
    num_scans: int = Field(557, ge=4)
    """Size of the embedded cohort (the paper's public set has 557 scans of one subject)."""
    lesion_fraction: _Float = Field(0.5, gt=0, lt=1)
    """Fraction of embedded scans that carry a simulated focal lesion (label 1)."""
    cohort_seed: int = 0
    low_percentile: _Float = Field(0.5, ge=0)
    high_percentile: _Float = Field(99.5, le=100)
    denoise: Denoise = "none"
    denoise_sigma: _Float = Field(0.6, ge=0)
    slices_per_volume: int = Field(1, ge=1)
    """2D from NIfTI: how many axial slices around the centre to take from each volume."""
    mask_suffix: str = Field("_seg", min_length=1)
    """Segmentation from NIfTI: the mask of ``x.nii.gz`` is ``x{mask_suffix}.nii.gz``."""
    foreground_crop: bool = False
    bad_files: BadFilePolicy = "error"
    """``error``: the first unreadable input stops the stage. ``skip``: warn and leave it out."""
    channels: Union[Literal["grey", "rgb"], _list(str)] = "grey"
    """What one scan's channels are: ``grey`` (one channel; a colour picture must have equal channels), ``rgb``
    (each colour channel of a picture is a sequence, e.g. T1, FLAIR, T1c), or a list of NIfTI file
    suffixes (``[t1, t1c, t2, flair]``: ``x_t1.nii.gz``, ``x_t1c.nii.gz``, ... make one scan)."""
    duplicates: DuplicatePolicy = "group"
    """Exact and near-duplicate images: ``group`` them into one subject (so a group never spans
    folds), ``drop`` all but one image per group, or ``keep`` them as they are (with a warning)."""
    duplicate_threshold: _Float = Field(0.97, gt=0, le=1)
    """Near-duplicates: normalised correlation at or above this, after a search over scale, shift and
    a left-right flip (``raysynth.data.duplicates``; precision and recall in BENCHMARKS.md)."""
    subject_pattern: Optional[str] = None
    """2D folders: a regular expression on the file name whose first group is the subject id
    (``^(TCGA_[A-Z]{2}_[0-9]{4})``); slices of one subject stay in one fold. A ``subjects.csv``
    (``file,subject``) in the folder does the same."""

    @field_validator("channels", mode="before")
    @classmethod
    def _channels_form(cls, v: Any) -> Any:
        if isinstance(v, tuple):
            v = list(v)
        if not (v in ("grey", "rgb") or (isinstance(v, list) and all(isinstance(c, str) for c in v))):
            raise ValueError(f"{v!r} is not valid; choose grey, rgb, or a list of NIfTI suffixes such as [t1, flair]")
        return v

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or not _distinct(v) or any(not c.strip() for c in v)):
            raise ValueError(f"{v} must be grey, rgb, or a list of distinct NIfTI suffixes")
        return v

    @field_validator("subject_pattern")
    @classmethod
    def _pattern(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        try:
            compiled = re.compile(v)
        except re.error as exc:
            raise ValueError(f"{v!r} is not a regular expression ({exc})") from None
        if compiled.groups < 1:
            raise ValueError(f"{v!r} needs a group, e.g. ^(TCGA_[A-Z]{{2}}_[0-9]{{4}}): its first group is the subject id")
        return v

    @field_validator("image_size")
    @classmethod
    def _halves_twice(cls, v: int) -> int:
        if v % 4:
            raise ValueError(f"{v} must be a multiple of 4 (the denoiser halves it twice)")
        return v

    @model_validator(mode="after")
    def _percentiles(self) -> "DataConfig":
        if not self.low_percentile < self.high_percentile:
            raise _Rule("low_percentile/high_percentile", "need 0 <= low < high <= 100, got "
                        f"{self.low_percentile}, {self.high_percentile}")
        return self


class CVConfig(_Model):
    """Cross-validation splits, written once to splits.json and read by every arm and seed."""

    folds: int = Field(4, ge=2)
    repeats: int = Field(1, ge=1)
    seed: int = 0


class DiffusionConfig(_Model):
    """The generator: noise process, denoiser size and its Ray Train fit."""

    process: Process = "ddpm"
    space: Space = "pixel"
    """Where the process runs: on the images themselves, or on the latents of a per-fold
    autoencoder (the ``autoencoder`` section; Rombach et al. 2022), which makes 128-256 px slices
    and 64-128 voxel volumes affordable."""
    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: _Float = Field(1e-4, gt=0)
    beta_end: _Float = Field(0.02, lt=1)
    gamma: _Float = Field(12.5, gt=0)
    """Diffusion constant of the paper's process X_t = X + sqrt(2*gamma*t)*eps (sigma_max = sqrt(2*gamma))."""
    sigma_min: _Float = Field(0.002, gt=0)
    """Gamma process: the smallest non-zero noise level sampled; must lie below sigma_max."""
    prediction_type: Prediction = "epsilon"
    """DDPM only: what the network predicts, the noise (Ho et al.), v = sqrt(abar) eps - sqrt(1-abar) x0
    (Salimans & Ho 2022) or x0 itself. (The gamma process predicts EDM's preconditioned target and
    the flow process the velocity eps - x0.)"""
    zero_terminal_snr: bool = False
    """DDPM only: rescale the betas so that the last step is pure noise (SNR 0), with trailing
    timestep spacing (Lin et al. 2024). Needs prediction_type v_prediction or sample."""
    snr_gamma: Optional[_Float] = Field(None, gt=0)
    """DDPM only: Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper); None: off."""
    flow_timesteps: FlowTimesteps = "logit_normal"
    """Flow process: training times t ~ sigmoid(N(0, 1)) (SD3's logit-normal) or U(0, 1)."""
    class_dropout: _Float = Field(0.0, ge=0, lt=1)
    """Probability that a training label is replaced by a null class, which classifier-free
    guidance (sampling.guidance_scale) needs; 0: no null class."""
    channels: _list(int) = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    attention: bool = False
    """Self-attention at the lowest resolution."""
    gradient_checkpointing: bool = False
    learning_rate: _Float = Field(5e-4, gt=0)
    weight_decay: _Float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    train_steps: int = Field(1200, ge=1)
    ema_decay: _Float = Field(0.999, ge=0, lt=1)
    grad_clip: _Float = Field(1.0, ge=0)
    """Largest gradient norm; 0: no clipping."""
    max_train_images: Optional[int] = Field(350, ge=2)
    """Cap on the real images a generator trains on (the paper used 350). None: the whole fold."""
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    checkpoint_every: int = Field(500, ge=1)
    max_failures: int = Field(2, ge=-1)
    """Ray Train restarts after a worker failure; -1: without limit (as in Ray)."""
    parallel_folds: bool = True
    max_parallel_folds: Optional[int] = Field(None, ge=1)
    """Folds training at once; None: as many as the cluster's current CPUs/GPUs hold. On an
    autoscaling cluster that starts from zero GPU nodes, set it to the number of GPU nodes wanted."""
    log_every: int = Field(50, ge=1)
    cpu_bf16: Literal[False, True, "auto"] = False
    """CPU workers only: the training forward under bf16 autocast (about 1.5x faster where the CPU
    has AVX512-BF16 or AMX; slower where it has neither). ``auto``: on where the CPU running the
    worker has them (``runtime.use_cpu_bf16``). Part of the generator's digest."""

    @field_validator("channels")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if not v or any(c <= 0 for c in v):
            raise ValueError(f"{v} must be a non-empty list of positive widths")
        return v

    @model_validator(mode="after")
    def _schedule(self) -> "DiffusionConfig":
        if not self.beta_start < self.beta_end:
            raise _Rule("beta_start/beta_end", f"need 0 < start < end < 1, got {self.beta_start}, {self.beta_end}")
        if self.process == "ddpm" and self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise _Rule("zero_terminal_snr", "needs prediction_type v_prediction or sample: at zero SNR the "
                        "noise prediction carries no information about x0 (Lin et al. 2024, Sec. 3.2)")
        if self.process == "gamma" and not self.sigma_min < math.sqrt(2.0 * self.gamma):
            raise _Rule("sigma_min", f"{self.sigma_min} must be below sigma_max = sqrt(2 * gamma) = "
                        f"{math.sqrt(2.0 * self.gamma):.4g} (gamma={self.gamma})")
        return self


class AutoencoderConfig(_Model):
    """The latent path's autoencoder (``diffusion.space=latent``): MONAI's ``AutoencoderKL``, one per
    fold and real-data size, trained on that part's real training images only, like the generator.
    Its Ray Train fit uses the diffusion section's workers, GPUs and failure policy."""

    channels: _list(int) = Field(default_factory=lambda: [32, 64, 64])
    """Widths per level; each level after the first halves every side."""
    downsampling_factor: int = Field(4, ge=2)
    """How much smaller each side of the latent is: must equal 2 ** (len(channels) - 1)."""
    latent_channels: int = Field(4, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    attention: bool = False
    """Self-attention at the lowest level and in the middle of encoder and decoder (costly on CPU)."""
    kl_weight: Optional[_Float] = Field(1e-6, ge=0)
    """Weight of the KL term that keeps the latent near N(0, I); None: off."""
    adversarial_weight: Optional[_Float] = Field(None, ge=0)
    """Weight of a patch-GAN loss (MONAI ``PatchDiscriminator``, least squares) from half the
    steps on, sharpening the decoder's output; None: off."""
    perceptual_weight: Optional[_Float] = Field(None, ge=0)
    """A perceptual loss needs pretrained weights that no installed package ships and no hub can
    be reached for here; it stays None (setting it is an error that says so)."""
    learning_rate: _Float = Field(2e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    train_steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)

    @field_validator("channels")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if len(v) < 2 or any(c <= 0 for c in v):
            raise ValueError(f"{v} must list at least two positive widths (one downsampling)")
        return v

    @model_validator(mode="after")
    def _factor(self) -> "AutoencoderConfig":
        if self.downsampling_factor != 2 ** (len(self.channels) - 1):
            raise _Rule("downsampling_factor", f"{self.downsampling_factor} does not match channels {self.channels}, "
                        f"which downsample by 2 ** {len(self.channels) - 1} = {2 ** (len(self.channels) - 1)}")
        if self.perceptual_weight is not None:
            raise _Rule("perceptual_weight", "a perceptual loss needs pretrained weights, which no installed package "
                        "ships and no model hub can be reached for; leave it null")
        return self


class CurateConfig(_Model):
    """A per-fold filter of synthetic samples, judged by a network trained on that fold's real
    training part only (the one the samples are added to; never a test part)."""

    threshold: _Float = Field(0.5, ge=0, le=1)
    """Classification: the least probability the curator gives a sample's conditioning label.
    Segmentation: the least Dice between the curator's mask and the generated mask."""
    oversample: _Float = Field(2.0, ge=1)
    """Sample this many times what the largest study ratio needs, so that ratios still find enough
    kept samples; an arm short of kept samples trains on those there are, and its trials say so."""
    epochs: Optional[int] = Field(None, ge=1)
    """The curator's training epochs (default: study.epochs); its network is the study's."""


class SamplingConfig(_Model):
    """Ray Data fan-out of sample requests to model-holding actors."""

    sampler: Sampler = "ddim"
    steps: int = Field(25, ge=1)
    ratio: _Float = Field(1.0, ge=0)
    """Synthetic samples per real training sample of each class (``balanced``: of the largest class)."""
    num_samples: Optional[int] = Field(None, ge=0)
    """Total synthetic samples per fold; overrides ``ratio`` when set."""
    class_balance: ClassBalance = "balanced"
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(128, ge=1)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    cpus_per_actor: int = Field(1, ge=1)
    gpus_per_actor: _Float = Field(0.0, ge=0)
    seed: int = 1234
    guidance_scale: _Float = Field(1.0, ge=0)
    """Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond). 1: the conditional model alone
    (no extra cost); 0: unconditional; above 1 needs a generator trained with diffusion.class_dropout > 0."""
    curate: Optional[CurateConfig] = None
    """Keep only synthetic samples a network trained on the fold's real training part agrees with
    (``synthetic/fold_k/curation.json``); null: keep every sample."""
    write_nifti: bool = True
    """3D only: also write one .nii.gz per sample (2D writes Parquet only)."""
    cpu_bf16: Literal[False, True, "auto"] = False
    """CPU actors only (``auto``: where the CPU has native bf16): the denoiser under bf16 autocast (about 2x faster where the CPU has
    AVX512-BF16 or AMX). Samples move slightly from fp32 ones, so it is part of the sampling digest."""

    @model_validator(mode="after")
    def _actors(self) -> "SamplingConfig":
        if self.max_actors < self.min_actors:
            raise _Rule("max_actors", f"{self.max_actors} is below sampling.min_actors ({self.min_actors})")
        return self


class StudyConfig(_Model):
    """The Ray Tune grid of downstream CNNs: arm (x ratio) x real fraction x fold x seed."""

    ARMS: ClassVar[dict[str, str]] = {
        "baseline": "real training data only",
        "classical": "real data with classical MRI augmentation (flips, affine, elastic, bias field, noise, gamma)",
        "synthetic": "real data plus synthetic data at each ratio",
        "synthetic+classical": "real plus synthetic data at each ratio, with classical augmentation",
        "synthetic_only": "synthetic data only at each ratio (tested on real data)",
        "synthetic_pretrain": "pretrained on synthetic data at each ratio, then fine-tuned on the real data",
    }
    """Valid arm names and what each trains on; every arm uses the same splits and seeds (a class
    constant, not a config key)."""
    SYNTHETIC_ARMS: ClassVar[tuple[str, ...]] = ("synthetic", "synthetic+classical", "synthetic_only",
                                                 "synthetic_pretrain")
    """Arms that train on synthetic samples (one condition per ratio)."""
    CLASSICAL_ARMS: ClassVar[tuple[str, ...]] = ("classical", "synthetic+classical")
    """Arms that train with classical MRI augmentation."""

    arms: _list(str) = Field(default_factory=lambda: ["baseline", "synthetic"])
    ratios: Optional[_list(_Float)] = None
    """Synthetic per real training sample of each class, one arm per ratio for every synthetic arm.
    None: ``[sampling.ratio]``. Samples are drawn once at the largest ratio; smaller ratios take
    the first samples of each class, so their sets are nested."""
    real_fractions: _list(_Float) = Field(default_factory=lambda: [1.0])
    """Scarcity curve: fractions of each fold's real training part (nested stratified subsets);
    synthetic arms get one generator per (fold, fraction), trained on that subset only."""
    seeds: _list(int) = Field(default_factory=lambda: [0, 1])
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: Optional[_Float] = Field(None, gt=0)
    """None: the task's default (1e-3 for classification; 1e-2 for segmentation, whose Dice+CE
    UNet barely moves at 1e-3 in a short schedule)."""
    width: int = Field(16, ge=1)
    cpus_per_trial: int = Field(1, ge=1)
    gpus_per_trial: _Float = Field(0.0, ge=0)
    max_failures: int = Field(1, ge=-1)
    """Retries of a failed trial; -1: without limit (as in Ray)."""
    primary_metric: str = "balanced_accuracy"

    @field_validator("arms")
    @classmethod
    def _arms(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one arm is needed")
        for arm in v:
            if arm not in cls.ARMS:
                raise ValueError(f"{arm!r} is not valid; choose from {list(cls.ARMS)}")
        if not _distinct(v):
            raise ValueError(f"{v} lists an arm twice")
        return v

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and (not v or any(r <= 0 for r in v) or not _distinct(v)):
            raise ValueError(f"{v} must be distinct numbers > 0 (or null for [sampling.ratio])")
        return v

    @field_validator("real_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 < p <= 1.0 for p in v) or not _distinct(v):
            raise ValueError(f"{v} must be distinct fractions in (0, 1]")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one seed is needed")
        return v

    @staticmethod
    def default_learning_rate(task: str) -> float:
        """The task's default: 1e-3 for classification; 1e-2 for segmentation (see ``learning_rate``)."""
        return 1e-2 if task == "segmentation" else 1e-3

    def lr_for(self, task: str) -> float:
        return self.learning_rate if self.learning_rate is not None else self.default_learning_rate(task)

    def ratios_for(self, sampling_ratio: float) -> list[float]:
        return list(self.ratios) if self.ratios is not None else [float(sampling_ratio)]


class QualityConfig(_Model):
    """Fidelity, coverage, diversity and the memorisation gate."""

    encoder: Encoder = "trained"
    encoder_epochs: int = Field(10, ge=1)
    feature_dim: int = Field(64, ge=1)
    knn: int = Field(3, ge=1)
    ncc_threshold: _Float = Field(0.95, gt=0, le=1)
    reference_quantile: Optional[_Float] = Field(0.995, gt=0, le=1)
    """Raise the NCC threshold to this quantile of held-out real scans' nearest-training NCC; the
    gate then allows ``max_memorised_fraction`` above the held-out scans' own rate over it.

    Scans of one subject (the embedded cohort, the paper's data) are all alike: distinct real scans
    reach NCC 0.96-0.98 with each other, so a fixed 0.95 would flag every faithful sample. A
    synthetic sample is a near-copy when it is closer to a training image than genuinely new real
    scans are. None: use ``ncc_threshold`` alone."""
    max_memorised_fraction: _Float = Field(0.01, ge=0, le=1)
    """Largest allowed excess of near-copies over held-out real scans' rate (with a reference)."""
    drop_memorised: bool = False


class RobustnessConfig(_Model):
    """Generalisation and robustness of the study's trained models, evaluated without retraining."""

    corruptions: _list(CorruptionName) = Field(
        default_factory=lambda: ["noise", "bias", "ghosting", "spike", "gibbs", "blur", "contrast"])
    """MRI artefacts applied to each split's real test part (``downstream.augment.CORRUPTIONS``)."""
    severities: _list(int) = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    seed: int = 0
    """Seed of the corruption draws; every arm and seed of a split sees the same corrupted images."""
    external_test: Optional[str] = None
    """A second dataset in any supported form (class folders, NIfTI + labels.csv), preprocessed
    like the main data and never seen by a generator or used for model selection."""
    builtin_external: bool = True
    """With the embedded cohort and no ``external_test``: use the cohort as seen by another
    simulated scanner (contrast, noise, resolution, bias) as the external test set."""
    external_scans: int = Field(200, ge=4)
    """Size of the built-in external set."""
    label_map: dict[str, str] = Field(default_factory=dict)
    """External class name -> training class name, for names that differ; the others must match."""
    calibration_bins: int = Field(10, ge=2)

    @field_validator("corruptions")
    @classmethod
    def _corruptions(cls, v: list[str]) -> list[str]:
        if not _distinct(v):
            raise ValueError(f"{v} lists a corruption twice")
        return v

    @field_validator("severities")
    @classmethod
    def _severities(cls, v: list[int]) -> list[int]:
        if any(not 1 <= s <= 5 for s in v) or not _distinct(v):
            raise ValueError(f"{v} must be distinct integers in 1..5")
        return v


class TuningConfig(_Model):
    """``raysynth tune``: a Ray Tune search over diffusion.gamma and learning rate (and process),
    scored on the Fréchet distance of samples to held-out real images, never on the loss (losses
    at different gammas live on different noise scales)."""

    num_samples: int = Field(8, ge=1)
    """Trials."""
    trial_steps: int = Field(400, ge=1)
    """Optimiser steps of a trial that ASHA never stops."""
    eval_every: int = Field(100, ge=1)
    """Steps between FD evaluations (each one is an ASHA report)."""
    eval_samples: int = Field(64, ge=2)
    """Samples per FD evaluation (at least 2, for a covariance)."""
    eval_steps: int = Field(10, ge=1)
    ddpm_sampler: Literal["ddpm", "ddim", "dpmsolver++"] = "ddim"
    gamma_sampler: Literal["euler", "heun"] = "heun"
    flow_sampler: Literal["euler", "heun"] = "euler"
    gamma_min: _Float = Field(2.0, gt=0)
    """sigma_max = sqrt(2 gamma) from 2 ..."""
    gamma_max: _Float = 2000.0
    """... to 63 (EDM's sigma_max = 80 is gamma = 3200)."""
    lr_min: _Float = Field(3e-5, gt=0)
    lr_max: _Float = 3e-3
    processes: _list(Process) = Field(default_factory=lambda: ["gamma"])
    grace_period: int = Field(100, ge=1)
    """Steps before ASHA may stop a trial."""
    reduction_factor: _Float = Field(2.0, gt=1)
    val_fraction: _Float = Field(0.2, gt=0, lt=1)
    """Share of the tuning fold's training part held out to score FD (its test part is never used)."""
    fold: int = Field(0, ge=0)
    cpus_per_trial: int = Field(1, ge=1)
    gpus_per_trial: _Float = Field(0.0, ge=0)
    """Fractional on a GPU cluster, e.g. 0.25."""
    max_concurrent_trials: int = Field(0, ge=0)
    """0: as many as the resources allow."""

    @field_validator("processes")
    @classmethod
    def _processes(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"at least one process is needed; choose from {list(SAMPLERS)}")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> "TuningConfig":
        for key in ("eval_every", "grace_period"):
            if getattr(self, key) > self.trial_steps:
                raise _Rule(key, f"{getattr(self, key)} must be <= trial_steps ({self.trial_steps})")
        for low, high in (("gamma_min", "gamma_max"), ("lr_min", "lr_max")):
            if not getattr(self, low) < getattr(self, high):
                raise _Rule(f"{low}/{high}", f"need 0 < {low} < {high}, got {getattr(self, low)}, {getattr(self, high)}")
        return self


class RayConfig(_Model):
    address: Optional[str] = None
    """None: join RAY_ADDRESS if set, else start a local instance."""
    num_cpus: Optional[int] = Field(None, ge=1)


class Config(_Model):
    data: DataConfig = Field(default_factory=DataConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    tune: TuningConfig = Field(default_factory=TuningConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    seed: int = 0

    @model_validator(mode="after")
    def _across_sections(self) -> "Config":
        """Rules that tie sections together (the sections check their own fields)."""
        df, s, st, tn = self.diffusion, self.sampling, self.study, self.tune
        valid_samplers = SAMPLERS[df.process]
        if s.sampler not in valid_samplers:
            raise _Rule("sampling.sampler", f"{s.sampler!r} does not fit diffusion.process={df.process!r}; "
                        f"choose one of {list(valid_samplers)}")
        if s.guidance_scale != 1.0 and df.class_dropout == 0:
            raise _Rule("sampling.guidance_scale", f"{s.guidance_scale} needs a generator that knows the null "
                        "class: set diffusion.class_dropout > 0 (0.1-0.2 is usual), or guidance_scale=1")
        if df.process == "ddpm" and s.steps > df.num_train_timesteps:
            raise _Rule("sampling.steps", f"{s.steps} exceeds diffusion.num_train_timesteps ({df.num_train_timesteps})")
        if "ddpm" in tn.processes and tn.eval_steps > df.num_train_timesteps:
            raise _Rule("tune.eval_steps", f"{tn.eval_steps} exceeds diffusion.num_train_timesteps "
                        f"({df.num_train_timesteps})")
        if st.ratios is None and s.ratio <= 0 and any(a in StudyConfig.SYNTHETIC_ARMS for a in st.arms):
            raise _Rule("study.ratios", "synthetic arms need a ratio > 0; set study.ratios or sampling.ratio")
        if df.space == "latent":
            _latent_rules(self.data.image_size, self.autoencoder.downsampling_factor, df.channels)
        if tn.fold >= self.cv.folds * self.cv.repeats:
            raise _Rule("tune.fold", f"{tn.fold} must be < cv.folds * cv.repeats ({self.cv.folds * self.cv.repeats})")
        return self

    # ---- serialisation -------------------------------------------------------------------
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
        for dotted, default in OPT_IN_FIELDS.items():
            section, name = dotted.split(".")
            if isinstance(plain.get(section), dict) and name in plain[section] and plain[section][name] == default:
                del plain[section][name]
        blob = json.dumps(plain, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def validate(self) -> "Config":
        """Check the whole tree again (construction already did; this catches rules across
        sections that a later assignment to one section broke) and return ``self``."""
        _validate(Config, self.model_dump(), "")
        return self


def _latent_rules(image_size: int, factor: int, denoiser_channels: list[int]) -> None:
    """The latent path's sizes: the image divides into latents big enough for the denoiser."""
    if image_size % factor:
        raise _Rule("data.image_size", f"{image_size} is not divisible by autoencoder.downsampling_factor {factor}; "
                    f"choose a multiple of {factor} (e.g. {max(factor, image_size // factor * factor)})")
    latent = image_size // factor
    divisor = 2 ** (len(denoiser_channels) - 1)
    if latent < 4 or latent % divisor:
        raise _Rule("data.image_size", f"{image_size} is too small for the latent path: its latents have side "
                    f"{latent} (image_size / autoencoder.downsampling_factor {factor}), which must be >= 4 and "
                    f"divisible by 2 ** (len(diffusion.channels) - 1) = {divisor}")


_SECTION_OF: dict[type, str] = {info.annotation: name for name, info in Config.model_fields.items()
                                if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)}
"""Section class -> its key in :class:`Config`, for the dotted paths of errors."""


# ---- building --------------------------------------------------------------------------------

def load_config(
    preset: str = "default",
    file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Preset, then YAML file, then ``key.sub=value`` overrides; validated once, at the end (so an
    override may fix what the file alone would break, e.g. a process and its sampler)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {preset_names()}")
    tree = from_dict(PRESETS[preset]).to_dict()
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
        tree = _deep_merge(tree, loaded)
    for item in overrides:
        _set(tree, item)
    return from_dict(tree)


def apply_override(cfg: Config, item: str) -> Config:
    """Apply one ``key.sub=value`` override; the value is parsed as YAML (``[32, 64]``, ``null``)."""
    return from_dict(_set(cfg.to_dict(), item))


def from_dict(raw: dict[str, Any]) -> Config:
    return _validate(Config, raw, "")


def section_from_dict(cls: type, raw: dict[str, Any], path: str = "") -> Any:
    """Rebuild one config section (e.g. the DiffusionConfig saved beside a checkpoint), validated."""
    return _validate(cls, raw, path)


def _set(tree: dict[str, Any], item: str) -> dict[str, Any]:
    """Set ``key.sub=value`` in the plain ``tree`` (in place, and returned); unknown keys are errors."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = tree
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, dict) and part in node and node[part] is None and depth > 0:
            node[part] = {}  # an optional section that is off (sampling.curate): setting a key turns it on
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: unknown config section")
        node = node[part]
    if parts[-1] not in node and node != {}:
        raise ConfigError(f"{key}: unknown config key; valid keys here: {sorted(node)}")
    node[parts[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _to_plain(obj: Any) -> Any:
    return obj.model_dump() if isinstance(obj, BaseModel) else obj


def _validate(cls: type, raw: Any, path: str) -> Any:
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc, cls, path) from None


# ---- pydantic's errors, as one line with the dotted key path ---------------------------------

_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true/false", "bool_parsing": "true/false",
    "string_type": "a string",
}
_BOUNDS = {"greater_than_equal": "ge", "greater_than": "gt", "less_than_equal": "le", "less_than": "lt"}


def _config_error(exc: ValidationError, root: type, prefix: str) -> ConfigError:
    """The first error of ``exc`` (unknown keys before the others, as they make the rest moot)."""
    errors = exc.errors(include_url=False)
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    err = min(extra, key=lambda e: (len(e["loc"]), [str(p) for p in e["loc"]])) if extra else errors[0]
    return ConfigError(_describe(err, root, prefix))


def _unwrap(tp: Any) -> tuple[Any, list]:
    """``tp`` without Optional and Annotated, and the Annotated metadata met on the way."""
    meta: list = []
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            meta += list(tp.__metadata__)
            tp = typing.get_args(tp)[0]
        elif origin is typing.Union:
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(inner) != 1:
                return tp, meta
            tp = inner[0]
        else:
            return tp, meta


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _describe(err: dict, root: type, prefix: str) -> str:
    loc, kind, value = err["loc"], err["type"], err.get("input")
    path, tp, parent, meta, nullable = prefix, root, root, [], False
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = parts[i]
        tp, more = _unwrap(tp)
        meta = more
        if _is_model(tp):
            parent, info = tp, tp.model_fields.get(part) if isinstance(part, str) else None
            path = f"{path}.{part}" if path else str(part)
            tp, meta = (info.annotation, list(info.metadata)) if info is not None else (None, [])
            nullable = type(None) in typing.get_args(tp)
        elif typing.get_origin(tp) is list:
            path, nullable = f"{path}[{part}]", False
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            nullable = False
            if i + 1 < len(parts) and parts[i + 1] == "[key]":
                path, tp = f"{path} key {part!r}", typing.get_args(tp)[0]
                i += 1
            else:
                path, tp = f"{path}.{part}", typing.get_args(tp)[1]
        else:
            path, tp = (f"{path}.{part}" if path else str(part)), None
        i += 1
    where = path or "<root>"
    tp, more = _unwrap(tp)
    meta += more

    if kind == "extra_forbidden":
        return f"{path}: unknown config key; valid keys here: {sorted(parent.model_fields)}"
    if kind == "value_error":
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, _Rule):
            key = f"{path}.{error.key}" if path and error.key else (error.key or where)
            return f"{key}: {error.text}"
        return f"{where}: {error if error is not None else err['msg']}"
    if kind in _EXPECTED:
        return f"{where}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind in ("model_type", "model_attributes_type"):
        return f"{where}: expected a mapping, got {type(value).__name__}"
    if kind == "dict_type":
        return f"{where}: expected a mapping, got {type(value).__name__} {value!r}"
    if kind == "list_type":
        return f"{where}: expected a list, got {type(value).__name__} {value!r}"
    if kind == "literal_error":
        choices = list(typing.get_args(tp)) if typing.get_origin(tp) is Literal else err["ctx"]["expected"]
        return f"{where}: {value!r} is not valid; choose one of {choices}"
    if kind in _BOUNDS:
        return f"{where}: {value} must {_bounds_text(meta, err.get('ctx') or {})}{' or be null' if nullable else ''}"
    if kind == "string_too_short":
        return f"{where}: {value!r} must not be empty"
    return f"{where}: {err['msg']} (got {value!r})"


def _bounds_text(meta: list, ctx: dict) -> str:
    """``be >= 1``, or ``lie in (0, 1]`` where the field has bounds on both sides."""
    bounds = {}
    for m in meta:
        for name in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(annotated_types, name.capitalize())):
                bounds[name] = getattr(m, name)
    bounds = bounds or dict(ctx)
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if lo and hi:
        return f"lie in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
    (name, bound), = ((k, v) for k, v in bounds.items() if k in ("ge", "gt", "le", "lt"))
    return f"be {dict(ge='>=', gt='>', le='<=', lt='<')[name]} {bound}"
