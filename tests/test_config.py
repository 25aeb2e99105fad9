"""The config schema: presets, layering, YAML round trips, overrides, one-line errors, digests.

Invalid configurations are a table of small cases, one assertion each: the override (or file
content) and a fragment of the one-line ConfigError it must give.
"""

import hashlib
import json

import pytest
import yaml

from raysynth.config import (OPT_IN_FIELDS, Config, ConfigError, DataConfig, DiffusionConfig, SamplingConfig,
                             StudyConfig, TuningConfig, apply_override, from_dict, load_config, preset_names,
                             section_from_dict)

SECTIONS = ["data", "cv", "diffusion", "autoencoder", "sampling", "study", "quality", "robustness", "tune", "ray"]


# ---- presets, layering, round trips ---------------------------------------------------------------


@pytest.mark.parametrize("preset", preset_names())
def test_presets_are_valid_and_round_trip_through_yaml(preset, tmp_path):
    cfg = load_config(preset)
    assert cfg.validate() is cfg
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(preset, path)
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_presets_live_in_their_own_module_and_are_re_exported():
    from raysynth import config, presets

    assert config.PRESETS is presets.PRESETS and config.preset_names() == presets.preset_names()
    assert preset_names() == ["smoke", "default", "gpu", "latent", "latent3d"]


def test_layering_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sampling": {"ratio": 2.0, "steps": 7}}))
    cfg = load_config("smoke", path, ["sampling.steps=9", "diffusion.channels=[8, 16]", "data.source=/x"])
    assert cfg.sampling.ratio == 2.0
    assert cfg.sampling.steps == 9
    assert cfg.diffusion.channels == [8, 16]
    assert cfg.data.source == "/x"
    assert cfg.data.image_size == 16  # from the smoke preset


def test_the_tree_is_validated_once_after_every_layer(tmp_path):
    # Alone, the file's process does not fit the preset's sampler; the override completes the pair.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"diffusion": {"process": "gamma"}}))
    cfg = load_config("smoke", path, ["sampling.sampler=heun"])
    assert (cfg.diffusion.process, cfg.sampling.sampler) == ("gamma", "heun")
    cfg = load_config("smoke", None, ["diffusion.process=gamma", "sampling.sampler=euler"])
    assert cfg.sampling.sampler == "euler"


@pytest.mark.parametrize(
    "override, path, expected",
    [
        ("study.arms=[baseline, classical]", "study.arms", ["baseline", "classical"]),
        ("data.source=null", "data.source", None),
        ("data.source='/scans/study #2'", "data.source", "/scans/study #2"),  # YAML: quote a '#'
        ("diffusion.learning_rate=5e-4", "diffusion.learning_rate", 5e-4),  # YAML 1.1 reads a string
        ("sampling.ratio=2", "sampling.ratio", 2.0),
        ("diffusion.channels=[8, 16]", "diffusion.channels", [8, 16]),
        ("diffusion.max_train_images=null", "diffusion.max_train_images", None),
        ("study.ratios=[0.5, 1, 2]", "study.ratios", [0.5, 1.0, 2.0]),
        ("robustness.label_map={tumour: lesion}", "robustness.label_map", {"tumour": "lesion"}),
        ("tune.processes=[ddpm, gamma]", "tune.processes", ["ddpm", "gamma"]),
        ("ray.address=auto", "ray.address", "auto"),
        ("seed=7", "seed", 7),
    ],
)
def test_set_overrides(override, path, expected):
    cfg = load_config("smoke", None, [override])
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    assert node == expected and type(node) is type(expected)
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_int_for_a_float_field_is_stored_as_a_float():
    cfg = apply_override(Config(), "sampling.ratio=2")
    assert isinstance(cfg.sampling.ratio, float) and isinstance(cfg.to_dict()["sampling"]["ratio"], float)
    assert isinstance(SamplingConfig(ratio=3).ratio, float)
    assert apply_override(Config(), "study.ratios=[1, 2]").study.ratios == [1.0, 2.0]


# ---- invalid configurations: one line, the dotted key path ----------------------------------------


@pytest.mark.parametrize(
    "override, fragment",
    [
        # the override itself
        ("novalue", "expected key.sub=value"),
        ("nope.x=1", "nope: unknown config section"),
        ("sampling.steps.x=1", "sampling.steps: unknown config section"),
        # an unknown key in each section, and at the top
        ("stepz=1", "stepz: unknown config key; valid keys here: ['autoencoder', 'cv', 'data',"),
        ("data.sauce=/x", "data.sauce: unknown config key; valid keys here: ["),
        ("cv.fold=3", "cv.fold: unknown config key"),
        ("diffusion.lr=0.1", "diffusion.lr: unknown config key"),
        ("sampling.stepz=3", "sampling.stepz: unknown config key"),
        ("study.arm=[baseline]", "study.arm: unknown config key"),
        ("quality.k=3", "quality.k: unknown config key"),
        ("robustness.severity=[1]", "robustness.severity: unknown config key"),
        ("tune.num_trials=3", "tune.num_trials: unknown config key"),
        ("ray.cpus=2", "ray.cpus: unknown config key"),
        # wrong types: strict (a string is not an int, a bool not a number)
        ("sampling.steps=abc", "sampling.steps: expected an integer, got 'abc'"),
        ("sampling.steps='5'", "sampling.steps: expected an integer, got '5'"),
        ("sampling.steps=2.0", "sampling.steps: expected an integer, got 2.0"),
        ("sampling.steps=true", "sampling.steps: expected an integer, got True"),
        ("diffusion.learning_rate=fast", "diffusion.learning_rate: expected a number, got 'fast'"),
        ("sampling.ratio=true", "sampling.ratio: expected a number, got True"),
        ("diffusion.use_gpu=3", "diffusion.use_gpu: expected true/false, got 3"),
        ("diffusion.use_gpu=yes please", "diffusion.use_gpu: expected true/false"),
        ("data.source=5", "data.source: expected a string, got 5"),
        ("diffusion.channels=5", "diffusion.channels: expected a list, got int 5"),
        ("diffusion.channels=[8, x]", "diffusion.channels[1]: expected an integer, got 'x'"),
        ("robustness.label_map=[a]", "robustness.label_map: expected a mapping, got list"),
        ("robustness.label_map={a: 1}", "robustness.label_map.a: expected a string, got 1"),
        ("data=5", "data: expected a mapping, got int"),
        # options list their valid choices
        ("sampling.sampler=euler2", "sampling.sampler: 'euler2' is not valid; choose one of"),
        ("data.dims=4", "data.dims: 4 is not valid; choose one of [2, 3]"),
        ("robustness.corruptions=[noise, rain]", "robustness.corruptions[1]: 'rain' is not valid; choose one of"),
        ("tune.gamma_sampler=ddim", "tune.gamma_sampler: 'ddim' is not valid; choose one of ['euler', 'heun']"),
        # ranges
        ("data.image_size=30", "data.image_size: 30 must be a multiple of 4"),
        ("data.image_size=4", "data.image_size: 4 must be >= 8"),
        ("data.num_scans=3", "data.num_scans: 3 must be >= 4"),
        ("data.lesion_fraction=1", "data.lesion_fraction: 1 must lie in (0, 1)"),
        ("data.low_percentile=99.9", "data.low_percentile/high_percentile: need 0 <= low < high <= 100"),
        ("data.slices_per_volume=0", "data.slices_per_volume: 0 must be >= 1"),
        ("cv.folds=1", "cv.folds: 1 must be >= 2"),
        ("cv.repeats=0", "cv.repeats: 0 must be >= 1"),
        ("diffusion.log_every=0", "diffusion.log_every: 0 must be >= 1"),
        ("diffusion.checkpoint_every=0", "diffusion.checkpoint_every: 0 must be >= 1"),
        ("diffusion.train_steps=0", "diffusion.train_steps: 0 must be >= 1"),
        ("diffusion.batch_size=0", "diffusion.batch_size: 0 must be >= 1"),
        ("diffusion.num_workers=0", "diffusion.num_workers: 0 must be >= 1"),
        ("diffusion.num_train_timesteps=1", "diffusion.num_train_timesteps: 1 must be >= 2"),
        ("diffusion.layers_per_block=0", "diffusion.layers_per_block: 0 must be >= 1"),
        ("diffusion.max_parallel_folds=0", "diffusion.max_parallel_folds: 0 must be >= 1 or be null"),
        ("diffusion.max_train_images=1", "diffusion.max_train_images: 1 must be >= 2 or be null"),
        ("diffusion.beta_start=0.5", "diffusion.beta_start/beta_end: need 0 < start < end < 1"),
        ("diffusion.beta_end=1", "diffusion.beta_end: 1 must be < 1"),
        ("diffusion.gamma=0", "diffusion.gamma: 0 must be > 0"),
        ("diffusion.channels=[]", "diffusion.channels: [] must be a non-empty list of positive widths"),
        ("diffusion.channels=[8, 0]", "diffusion.channels: [8, 0] must be a non-empty list of positive widths"),
        ("diffusion.ema_decay=1", "diffusion.ema_decay: 1 must lie in [0, 1)"),
        ("diffusion.learning_rate=0", "diffusion.learning_rate: 0 must be > 0"),
        ("sampling.steps=0", "sampling.steps: 0 must be >= 1"),
        ("sampling.steps=1001", "sampling.steps: 1001 exceeds diffusion.num_train_timesteps (1000)"),
        ("sampling.ratio=-1", "sampling.ratio: -1 must be >= 0"),
        ("sampling.num_samples=-1", "sampling.num_samples: -1 must be >= 0 or be null"),
        ("sampling.batch_size=0", "sampling.batch_size: 0 must be >= 1"),
        ("sampling.shard_size=0", "sampling.shard_size: 0 must be >= 1"),
        ("sampling.min_actors=0", "sampling.min_actors: 0 must be >= 1"),
        ("sampling.max_actors=0", "sampling.max_actors: 0 must be >= 1"),
        ("sampling.min_actors=2", "sampling.max_actors: 1 is below sampling.min_actors (2)"),
        ("study.epochs=0", "study.epochs: 0 must be >= 1"),
        ("study.batch_size=0", "study.batch_size: 0 must be >= 1"),
        ("study.width=0", "study.width: 0 must be >= 1"),
        ("quality.encoder_epochs=0", "quality.encoder_epochs: 0 must be >= 1"),
        ("quality.knn=0", "quality.knn: 0 must be >= 1"),
        ("quality.ncc_threshold=0", "quality.ncc_threshold: 0 must lie in (0, 1]"),
        ("quality.reference_quantile=1.5", "quality.reference_quantile: 1.5 must lie in (0, 1] or be null"),
        ("robustness.external_scans=3", "robustness.external_scans: 3 must be >= 4"),
        ("robustness.calibration_bins=1", "robustness.calibration_bins: 1 must be >= 2"),
        ("robustness.severities=[0, 2]", "robustness.severities: [0, 2] must be distinct integers in 1..5"),
        ("robustness.severities=[2, 2]", "robustness.severities: [2, 2] must be distinct integers in 1..5"),
        ("robustness.corruptions=[noise, noise]", "robustness.corruptions: ['noise', 'noise'] lists a corruption twice"),
        ("ray.num_cpus=0", "ray.num_cpus: 0 must be >= 1 or be null"),
        # the study design
        ("study.arms=[]", "study.arms: at least one arm is needed"),
        ("study.arms=[baseline, augmented]", "study.arms: 'augmented' is not valid; choose from ['baseline',"),
        ("study.arms=[baseline, baseline]", "study.arms: ['baseline', 'baseline'] lists an arm twice"),
        ("study.ratios=[]", "study.ratios: [] must be distinct numbers > 0"),
        ("study.ratios=[0]", "study.ratios: [0.0] must be distinct numbers > 0"),
        ("study.ratios=[1, 1]", "study.ratios: [1.0, 1.0] must be distinct numbers > 0"),
        ("study.real_fractions=[0]", "study.real_fractions: [0.0] must be distinct fractions in (0, 1]"),
        ("study.real_fractions=[1.5]", "study.real_fractions: [1.5] must be distinct fractions in (0, 1]"),
        ("study.real_fractions=[0.5, 0.5]", "study.real_fractions: [0.5, 0.5] must be distinct fractions in (0, 1]"),
        ("study.seeds=[]", "study.seeds: at least one seed is needed"),
        ("sampling.ratio=0", "study.ratios: synthetic arms need a ratio > 0; set study.ratios or sampling.ratio"),
        # the sampler must fit the process
        ("diffusion.process=gamma", "sampling.sampler: 'ddim' does not fit diffusion.process='gamma'; choose one of ['euler', 'heun']"),
        ("sampling.sampler=heun", "sampling.sampler: 'heun' does not fit diffusion.process='ddpm'"),
        # the tune section is validated at load, not only when tune runs
        ("tune.num_samples=0", "tune.num_samples: 0 must be >= 1"),
        ("tune.trial_steps=0", "tune.trial_steps: 0 must be >= 1"),
        ("tune.eval_every=0", "tune.eval_every: 0 must be >= 1"),
        ("tune.eval_every=30", "tune.eval_every: 30 must be <= trial_steps (20)"),
        ("tune.grace_period=30", "tune.grace_period: 30 must be <= trial_steps (20)"),
        ("tune.eval_samples=1", "tune.eval_samples: 1 must be >= 2"),
        ("tune.eval_steps=0", "tune.eval_steps: 0 must be >= 1"),
        ("tune.gamma_max=2", "tune.gamma_min/gamma_max: need 0 < gamma_min < gamma_max, got 2.0, 2.0"),
        ("tune.gamma_min=0", "tune.gamma_min: 0 must be > 0"),
        ("tune.lr_min=0.01", "tune.lr_min/lr_max: need 0 < lr_min < lr_max, got 0.01, 0.003"),
        ("tune.processes=[]", "tune.processes: at least one process is needed"),
        ("tune.processes=[vp]", "tune.processes[0]: 'vp' is not valid; choose one of ['ddpm', 'gamma', 'flow']"),
        ("tune.reduction_factor=1", "tune.reduction_factor: 1 must be > 1"),
        ("tune.val_fraction=1", "tune.val_fraction: 1 must lie in (0, 1)"),
        ("tune.fold=-1", "tune.fold: -1 must be >= 0"),
        ("tune.fold=2", "tune.fold: 2 must be < cv.folds * cv.repeats (2)"),
        ("tune.cpus_per_trial=0", "tune.cpus_per_trial: 0 must be >= 1"),
        ("tune.gpus_per_trial=-1", "tune.gpus_per_trial: -1 must be >= 0"),
        ("tune.max_concurrent_trials=-1", "tune.max_concurrent_trials: -1 must be >= 0"),
    ],
)
def test_invalid_override_gives_one_line_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", None, [override])
    message = str(err.value)
    assert fragment in message and "\n" not in message, message


@pytest.mark.parametrize(
    "tree, fragment",
    [
        ({"diffusion": {"lr": 1e-3}}, "diffusion.lr: unknown config key"),
        ({"diffusion": {"lr": 1e-3, "log_every": "x"}}, "diffusion.lr: unknown config key"),  # unknown keys first
        ({"diffusion": {"log_every": 0}}, "diffusion.log_every: 0 must be >= 1"),
        ({"tune": {"lr_min": 1.0, "lr_max": 0.5}}, "tune.lr_min/lr_max: need 0 < lr_min < lr_max"),
        ({"sampling": None}, "sampling: expected a mapping, got NoneType"),
        ({"study": {"seeds": [0, "one"]}}, "study.seeds[1]: expected an integer, got 'one'"),
    ],
)
def test_invalid_file_gives_one_line_naming_the_key(tree, fragment, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as err:
        load_config("default", path)
    assert fragment in str(err.value), str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("default", tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("[1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("default", bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config("default", lst)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("huge")


# ---- the models in Python: construction, assignment, copies -----------------------------------------


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: DataConfig(dims=4), "data.dims: 4 is not valid; choose one of [2, 3]"),
        (lambda: DataConfig(image_size="32"), "data.image_size: expected an integer, got '32'"),
        (lambda: DiffusionConfig(process="vp"), "diffusion.process: 'vp' is not valid; choose one of ['ddpm', 'gamma', 'flow']"),
        (lambda: DiffusionConfig(log_every=0), "diffusion.log_every: 0 must be >= 1"),
        (lambda: DiffusionConfig(lr=1e-3), "diffusion.lr: unknown config key"),
        (lambda: DiffusionConfig(process="gamma", gamma=1e-6), "diffusion.sigma_min: 0.002 must be below sigma_max"),
        (lambda: TuningConfig(gamma_min=10.0, gamma_max=5.0), "tune.gamma_min/gamma_max: need 0 < gamma_min < gamma_max"),
        (lambda: Config(sampling=SamplingConfig(sampler="heun")), "sampling.sampler: 'heun' does not fit"),
        (lambda: from_dict(5), "<root>: expected a mapping, got int"),
        (lambda: section_from_dict(DiffusionConfig, {"log_every": 0}, "diffusion"), "diffusion.log_every: 0 must be >= 1"),
        (lambda: section_from_dict(DiffusionConfig, {"log_every": 0}), "log_every: 0 must be >= 1"),
    ],
)
def test_constructing_invalid_models_raises_a_config_error(build, fragment):
    with pytest.raises(ConfigError) as err:
        build()
    assert fragment in str(err.value), str(err.value)


def test_keyword_construction_and_a_section_from_its_dict():
    kept = SamplingConfig(sampler="ddpm", steps=7, seed=3)
    cfg = Config(sampling=kept)
    assert cfg.sampling == kept and cfg.diffusion == DiffusionConfig()
    assert section_from_dict(DiffusionConfig, DiffusionConfig(log_every=7).to_dict(), "diffusion").log_every == 7
    assert DiffusionConfig(channels=(8, 16)).channels == [8, 16]  # a tuple is taken for a list, as before


def test_assignment_is_validated_and_a_refused_value_is_not_kept():
    cfg = Config()
    cfg.data.source = "/x"
    assert cfg.data.source == "/x"
    with pytest.raises(ConfigError, match=r"diffusion\.log_every: 0 must be >= 1"):
        cfg.diffusion.log_every = 0
    with pytest.raises(ConfigError, match="data.low_percentile/high_percentile"):
        cfg.data.low_percentile = 99.9
    assert cfg.diffusion.log_every == 50 and cfg.data.low_percentile == 0.5
    # A rule across sections is checked again by validate().
    cfg.diffusion.process = "gamma"
    with pytest.raises(ConfigError, match="sampling.sampler: 'ddim' does not fit"):
        cfg.validate()


def test_replace_returns_a_validated_copy():
    cfg = load_config("smoke")
    gamma = cfg.diffusion.replace(process="gamma", gamma=50.0)
    assert gamma.process == "gamma" and cfg.diffusion.process == "ddpm"
    tuned = cfg.replace(diffusion=gamma, sampling=cfg.sampling.replace(sampler="heun"))
    assert (tuned.diffusion.gamma, tuned.sampling.sampler) == (50.0, "heun") and cfg.sampling.sampler == "ddim"
    with pytest.raises(ConfigError, match="sampling.sampler: 'ddim' does not fit"):
        cfg.replace(diffusion=gamma)
    with pytest.raises(ConfigError, match="diffusion.log_every"):
        cfg.diffusion.replace(log_every=0)
    assert cfg.data.replace(source="/ext").source == "/ext" and cfg.data.source is None


def test_study_helpers_and_arms_constant():
    st = StudyConfig()
    assert "ARMS" not in StudyConfig.model_fields and "baseline" in StudyConfig.ARMS
    assert st.lr_for("segmentation") == 1e-2 and st.lr_for("classification") == 1e-3
    assert StudyConfig(learning_rate=0.1).lr_for("segmentation") == 0.1
    assert st.ratios_for(2) == [2.0] and StudyConfig(ratios=[0.5, 1]).ratios_for(2) == [0.5, 1.0]


# ---- digests ------------------------------------------------------------------------------------------

DEFAULT_PLAIN = {
    "data": {"source": None, "dims": 2, "task": "classification", "image_size": 32, "num_scans": 557,
             "lesion_fraction": 0.5, "cohort_seed": 0, "low_percentile": 0.5, "high_percentile": 99.5,
             "denoise": "none", "denoise_sigma": 0.6, "slices_per_volume": 1, "mask_suffix": "_seg",
             "foreground_crop": False, "bad_files": "error", "channels": "grey",
             "duplicates": "group", "duplicate_threshold": 0.97, "subject_pattern": None},
    "cv": {"folds": 4, "repeats": 1, "seed": 0},
    "diffusion": {"process": "ddpm", "space": "pixel", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                  "gamma": 12.5, "sigma_min": 0.002, "prediction_type": "epsilon", "zero_terminal_snr": False,
                  "snr_gamma": None, "flow_timesteps": "logit_normal", "class_dropout": 0.0, "channels": [32, 64, 64], "layers_per_block": 1,
                  "attention": False, "gradient_checkpointing": False, "learning_rate": 0.0005, "weight_decay": 0.0,
                  "batch_size": 32, "train_steps": 1200, "ema_decay": 0.999, "grad_clip": 1.0,
                  "max_train_images": 350, "num_workers": 1, "cpus_per_worker": 1, "use_gpu": False,
                  "checkpoint_every": 500, "max_failures": 2, "parallel_folds": True, "max_parallel_folds": None,
                  "log_every": 50, "cpu_bf16": False},
    "autoencoder": {"channels": [32, 64, 64], "downsampling_factor": 4, "latent_channels": 4, "num_res_blocks": 1,
                    "attention": False, "kl_weight": 1e-06, "adversarial_weight": None, "perceptual_weight": None,
                    "learning_rate": 0.0002, "batch_size": 16, "train_steps": 1000, "checkpoint_every": 500,
                    "log_every": 50},
    "sampling": {"sampler": "ddim", "steps": 25, "ratio": 1.0, "num_samples": None, "class_balance": "balanced",
                 "batch_size": 32, "shard_size": 128, "min_actors": 1, "max_actors": 2, "cpus_per_actor": 1,
                 "gpus_per_actor": 0.0, "seed": 1234, "guidance_scale": 1.0, "curate": None, "write_nifti": True, "cpu_bf16": False},
    "study": {"arms": ["baseline", "synthetic"], "ratios": None, "real_fractions": [1.0], "seeds": [0, 1],
              "epochs": 15, "batch_size": 32, "learning_rate": None, "width": 16, "cpus_per_trial": 1,
              "gpus_per_trial": 0.0, "max_failures": 1, "primary_metric": "balanced_accuracy"},
    "quality": {"encoder": "trained", "encoder_epochs": 10, "feature_dim": 64, "knn": 3, "ncc_threshold": 0.95,
                "reference_quantile": 0.995, "max_memorised_fraction": 0.01, "drop_memorised": False},
    "robustness": {"corruptions": ["noise", "bias", "ghosting", "spike", "gibbs", "blur", "contrast"],
                   "severities": [1, 2, 3, 4, 5], "seed": 0, "external_test": None, "builtin_external": True,
                   "external_scans": 200, "label_map": {}, "calibration_bins": 10},
    "tune": {"num_samples": 8, "trial_steps": 400, "eval_every": 100, "eval_samples": 64, "eval_steps": 10,
             "ddpm_sampler": "ddim", "gamma_sampler": "heun", "flow_sampler": "euler", "gamma_min": 2.0, "gamma_max": 2000.0,
             "lr_min": 3e-05, "lr_max": 0.003, "processes": ["gamma"], "grace_period": 100, "reduction_factor": 2.0,
             "val_fraction": 0.2, "fold": 0, "cpus_per_trial": 1, "gpus_per_trial": 0.0, "max_concurrent_trials": 0},
    "ray": {"address": None, "num_cpus": None},
    "seed": 0,
}
"""The default config as plain data: what ``to_dict`` gave when the sections were dataclasses."""


def _hash(plain) -> str:
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def test_digests_are_the_hash_of_the_plain_tree():
    """``to_dict`` keeps keys, order, ints, floats, lists and None, so digests of existing artifacts
    stay valid; opt-in fields leave a section digest while unset."""
    cfg = Config()  # the schema's defaults; the default preset sets its process on top
    assert json.dumps(cfg.to_dict()) == json.dumps(DEFAULT_PLAIN)  # also int vs float, and key order
    assert cfg.to_yaml() == yaml.safe_dump(DEFAULT_PLAIN, sort_keys=False)
    assert cfg.digest() == _hash(DEFAULT_PLAIN)
    opt_in = {}
    for dotted in OPT_IN_FIELDS:
        section, name = dotted.split(".")
        opt_in.setdefault(section, set()).add(name)
    for section in SECTIONS:
        plain = {k: v for k, v in DEFAULT_PLAIN[section].items() if k not in opt_in.get(section, ())}
        assert cfg.section_digest(section) == _hash({section: plain}), section
    trio = {s: {k: v for k, v in DEFAULT_PLAIN[s].items() if k not in opt_in.get(s, ())} for s in ("data", "cv", "diffusion")}
    assert cfg.section_digest("data", "cv", "diffusion") == _hash(trio)
    on = apply_override(cfg, "diffusion.cpu_bf16=true")
    unset = {k: v for k, v in DEFAULT_PLAIN["diffusion"].items() if k not in opt_in["diffusion"]}
    assert on.section_digest("diffusion") == _hash({"diffusion": {**unset, "cpu_bf16": True}})


def test_section_digest_tracks_only_its_sections():
    cfg = Config()
    other = apply_override(cfg, "study.epochs=99")
    assert cfg.section_digest("data", "diffusion") == other.section_digest("data", "diffusion")
    assert cfg.section_digest("study") != other.section_digest("study")
    assert from_dict(cfg.to_dict()) == cfg


def test_tune_settings_are_the_config_section():
    from raysynth.stages.tune import DEFAULT_SETTINGS

    assert TuningConfig().to_dict() == DEFAULT_SETTINGS
    assert load_config("smoke").tune.trial_steps == 20
