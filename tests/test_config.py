import pytest
import yaml

from raysynth.config import Config, ConfigError, apply_override, from_dict, load_config, preset_names


@pytest.mark.parametrize("preset", preset_names())
def test_presets_are_valid_and_round_trip_through_yaml(preset, tmp_path):
    cfg = load_config(preset)
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(preset, path)
    assert again == cfg
    assert again.digest() == cfg.digest()


def test_layering_preset_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sampling": {"ratio": 2.0, "steps": 7}}))
    cfg = load_config("smoke", path, ["sampling.steps=9", "diffusion.channels=[8, 16]", "data.source=/x"])
    assert cfg.sampling.ratio == 2.0
    assert cfg.sampling.steps == 9
    assert cfg.diffusion.channels == [8, 16]
    assert cfg.data.source == "/x"
    assert cfg.data.image_size == 16  # from the smoke preset


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("sampling.stepz=3", "sampling.stepz: unknown config key"),
        ("nope.x=1", "nope: unknown config section"),
        ("sampling.steps=abc", "sampling.steps: expected an integer"),
        ("sampling.sampler=euler2", "sampling.sampler: 'euler2' is not valid; choose one of"),
        ("data.dims=4", "data.dims: 4 is not valid"),
        ("diffusion.use_gpu=3", "diffusion.use_gpu: expected true/false"),
        ("diffusion.channels=5", "diffusion.channels: expected a list"),
        ("data.image_size=30", "data.image_size: 30 must be a multiple of 4"),
        ("cv.folds=1", "cv.folds: 1 must be >= 2"),
        ("sampling.max_actors=0", "sampling.max_actors"),
        ("novalue", "expected key.sub=value"),
        ("diffusion.process=gamma", "sampling.sampler: 'ddim' does not fit diffusion.process='gamma'"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_config("smoke", None, [override])
    assert fragment in str(err.value)


def test_unknown_key_in_file_gives_dotted_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"diffusion": {"lr": 1e-3}}))
    with pytest.raises(ConfigError, match=r"diffusion\.lr: unknown config key"):
        load_config("default", path)


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


def test_section_digest_tracks_only_its_sections():
    cfg = Config()
    other = apply_override(cfg, "study.epochs=99")
    assert cfg.section_digest("data", "diffusion") == other.section_digest("data", "diffusion")
    assert cfg.section_digest("study") != other.section_digest("study")
    assert from_dict(cfg.to_dict()) == cfg


def test_scientific_notation_without_a_dot_is_a_number():
    assert apply_override(Config(), "diffusion.learning_rate=5e-4").diffusion.learning_rate == 5e-4
    with pytest.raises(ConfigError, match="diffusion.learning_rate: expected a number"):
        apply_override(Config(), "diffusion.learning_rate=fast")


def test_int_accepted_for_float_but_not_bool_for_int():
    cfg = apply_override(Config(), "sampling.ratio=2")
    assert isinstance(cfg.sampling.ratio, float)
    with pytest.raises(ConfigError):
        apply_override(Config(), "sampling.steps=true")


def test_tune_settings_are_the_config_section():
    import dataclasses

    from raysynth.config import TuningConfig
    from raysynth.diffusion.tune import DEFAULT_SETTINGS

    assert dataclasses.asdict(TuningConfig()) == DEFAULT_SETTINGS
    assert load_config("smoke").tune.trial_steps == 20
