"""Property-based tests (hypothesis): the config parser and the image/volume loaders.

Config: every field takes random values of its type through a ``--set key=value`` override and
round-trips through YAML, or a range or cross-field rule refuses the value (never its type) naming
the field; random unknown keys and wrong types are refused with a ConfigError that names the
dotted path. Loaders: random pictures (sizes, modes L/RGB/RGBA/I;16, PNG/JPEG) in class
folders prepare to ``(N, S, S)`` in [-1, 1] with the folders' labels; random NIfTI volumes with
random affines (axis order, flips, spacings, oblique rotations) preprocess to the target cube, and
storing the same volume in another orientation gives the same model input.

Examples are few (``max_examples`` 10-25) and unbounded in time (``deadline=None``) so the file
fits CI on 2 loaded cores.
"""

from __future__ import annotations

import math
import os
import string
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel

from raysynth.config import Config, ConfigError, apply_override, from_dict, load_config

# Deterministic by default, so CI gives the same verdict on the same tree; set
# RAYSYNTH_HYPOTHESIS_EXPLORE=1 to draw fresh examples (and add any failure as an @example).
_DERANDOMIZE = os.environ.get("RAYSYNTH_HYPOTHESIS_EXPLORE") != "1"
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=_DERANDOMIZE)
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=_DERANDOMIZE)


# ---- the config tree, walked -------------------------------------------------------------------


def _is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _leaves(cls=Config, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, type)`` of every leaf field of the config tree (Annotated metadata stripped)."""
    hints = typing.get_type_hints(cls)
    out = []
    for name in cls.model_fields:
        tp = hints[name]
        path = f"{prefix}{name}"
        if _is_section(tp):
            out += _leaves(tp, path + ".")
        else:
            out.append((path, tp))
    return out


LEAVES = _leaves()
SECTIONS = [name for name, info in Config.model_fields.items() if _is_section(info.annotation)]


def _optional_inner(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0]
    return None


ints = st.integers(min_value=-(2**40), max_value=2**40)
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
texts = st.text(max_size=20)  # hypothesis leaves out surrogates by default


def valid_values(tp) -> st.SearchStrategy:
    """Values of exactly this type (not necessarily passing ``validate``)."""
    inner = _optional_inner(tp)
    if inner is not None:
        return st.none() | valid_values(inner)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    if origin is list:
        return st.lists(valid_values(typing.get_args(tp)[0]), max_size=5)
    if origin is dict:
        key, value = typing.get_args(tp)
        return st.dictionaries(valid_values(key), valid_values(value), max_size=3)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return ints
    if tp is float:
        return floats
    if tp is str:
        return texts
    raise AssertionError(f"no strategy for {tp}")


def _accepted_as_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def wrong_values(tp) -> st.SearchStrategy:
    """Values the field must refuse."""
    inner = _optional_inner(tp)
    if inner is not None:
        return wrong_values(inner).filter(lambda v: v is not None)
    origin = typing.get_origin(tp)
    mapping = st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=4), ints, min_size=1, max_size=2)
    if origin is Literal:
        allowed = typing.get_args(tp)
        return (st.text(max_size=8) | ints | st.booleans() | st.lists(ints, max_size=2)).filter(lambda v: v not in allowed)
    if origin is list:
        elem = typing.get_args(tp)[0]
        bad_elem = wrong_values(elem).filter(lambda v: not isinstance(v, (list, dict)))
        return (ints | texts | mapping | st.booleans()
                | st.tuples(st.lists(valid_values(elem), max_size=2), bad_elem).map(lambda t: t[0] + [t[1]]))
    if origin is dict:
        value = typing.get_args(tp)[1]
        bad_value = wrong_values(value).filter(lambda v: not isinstance(v, (list, dict)))
        return (ints | texts | st.booleans() | st.lists(ints, min_size=1, max_size=2)
                | st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=4), bad_value,
                                  min_size=1, max_size=2))
    if tp is bool:
        return ints | texts | floats | st.lists(st.booleans(), min_size=1, max_size=2) | st.none()
    if tp is int:
        return floats | st.booleans() | texts | st.lists(ints, min_size=1, max_size=2) | mapping | st.none()
    if tp is float:
        return st.booleans() | texts.filter(lambda s: not _accepted_as_float(s)) | st.lists(floats, max_size=2) | mapping | st.none()
    if tp is str:
        return ints | floats | st.booleans() | st.lists(texts, max_size=2) | mapping
    raise AssertionError(f"no strategy for {tp}")


def as_yaml_value(value: Any) -> str:
    """The text after ``=`` in ``--set key=value``: one line of YAML that loads back to ``value``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=False).rstrip("\n")
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    assert "\n" not in text, text
    return text


def get(cfg: Config, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b and type(a) is type(b)


@st.composite
def field_and_value(draw, values=valid_values):
    path, tp = draw(st.sampled_from(LEAVES))
    return path, tp, draw(values(tp))


# ---- config properties -------------------------------------------------------------------------


@SETTINGS
@given(field_and_value())
@example(("diffusion.log_every", int, 7))
@example(("robustness.label_map", dict[str, str], {"tumour": "lesion"}))
def test_any_typed_value_round_trips_through_an_override_and_yaml(item):
    """A value of the field's type is never refused for its type: it loads and round-trips, or a
    range or cross-field rule (validated at construction) refuses it with one line naming the field."""
    path, _, value = item
    try:
        cfg = apply_override(load_config("smoke"), f"{path}={as_yaml_value(value)}")
    except ConfigError as exc:
        message = str(exc)
        assert path.rsplit(".", 1)[-1] in message and ": expected " not in message, (path, value, message)
        assert "\n" not in message
        return
    assert same(get(cfg, path), value)
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and again.digest() == cfg.digest()


def _arm_names() -> list[str]:
    """The study's arm names, wherever config.py keeps them (a Literal type or StudyConfig.ARMS)."""
    from raysynth.config import StudyConfig

    arms = getattr(StudyConfig, "ARMS", None)
    if arms:
        return sorted(arms)
    return sorted(typing.get_args(typing.get_args(typing.get_type_hints(StudyConfig)["arms"])[0]))


@st.composite
def valid_configs(draw):
    """Override lists that pass ``validate`` as well as the type checks."""
    process = draw(st.sampled_from(["ddpm", "gamma"]))
    sampler = draw(st.sampled_from(["ddpm", "ddim", "dpmsolver++"] if process == "ddpm" else ["euler", "heun"]))
    beta_start = draw(st.floats(1e-6, 0.01))
    min_actors = draw(st.integers(1, 4))
    low = draw(st.floats(0.0, 49.0))
    picks = {
        "data.dims": draw(st.sampled_from([2, 3])),
        "data.image_size": 4 * draw(st.integers(2, 64)),
        "data.denoise": draw(st.sampled_from(["none", "gaussian", "median"])),
        "data.low_percentile": low,
        "data.high_percentile": draw(st.floats(low + 1.0, 100.0)),
        "data.source": draw(st.none() | st.text(string.ascii_letters + string.digits + "/._- ", min_size=1, max_size=30)),
        "cv.folds": draw(st.integers(2, 10)),
        "cv.seed": draw(ints),
        "diffusion.process": process,
        "diffusion.space": "pixel",  # sizes and widths below are drawn for pixel space
        "diffusion.beta_start": beta_start,
        "diffusion.beta_end": draw(st.floats(beta_start * 2, 0.5)),
        "diffusion.gamma": draw(st.floats(0.01, 100.0)),
        "diffusion.channels": draw(st.lists(st.integers(1, 512), min_size=1, max_size=5)),
        "diffusion.learning_rate": draw(st.floats(1e-7, 1.0)),
        "diffusion.max_train_images": draw(st.none() | st.integers(2, 10_000)),
        "diffusion.ema_decay": draw(st.floats(0.0, 0.9999)),
        "sampling.sampler": sampler,
        "sampling.steps": draw(st.integers(1, 1000)),
        "sampling.ratio": draw(st.floats(0.01, 50.0)),
        "sampling.num_samples": draw(st.none() | st.integers(0, 10**6)),
        "sampling.min_actors": min_actors,
        "sampling.max_actors": draw(st.integers(min_actors, 16)),
        "study.arms": draw(st.lists(st.sampled_from(_arm_names()), min_size=1, max_size=3, unique=True)),
        "study.seeds": draw(st.lists(ints, min_size=1, max_size=4)),
        "study.learning_rate": draw(st.none() | st.floats(1e-6, 1.0)),
        "quality.ncc_threshold": draw(st.floats(0.01, 1.0)),
        "ray.address": draw(st.none() | st.sampled_from(["auto", "ray://head:10001", "127.0.0.1:6379"])),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(picks)), unique=True, max_size=len(picks)))
    # Cross-field pairs travel together so every subset stays valid.
    for a, b in [("diffusion.process", "sampling.sampler"), ("diffusion.beta_start", "diffusion.beta_end"),
                 ("data.low_percentile", "data.high_percentile"), ("sampling.min_actors", "sampling.max_actors"),
                 ("data.image_size", "diffusion.space"), ("diffusion.channels", "diffusion.space")]:
        if a in chosen or b in chosen:
            chosen = sorted(set(chosen) | {a, b})
    return {k: picks[k] for k in chosen}


@SETTINGS
@given(valid_configs(), st.sampled_from(["smoke", "default", "gpu"]))
def test_valid_overrides_load_and_the_printed_yaml_loads_back_the_same(picks, preset):
    cfg = load_config(preset, overrides=[f"{k}={as_yaml_value(v)}" for k, v in picks.items()])
    for key, value in picks.items():
        assert same(get(cfg, key), value), key
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resolved.yaml"
        path.write_text(cfg.to_yaml())  # what `raysynth config` prints, saved and passed back
        for base in ("smoke", "default"):
            again = load_config(base, path)
            assert again == cfg and again.digest() == cfg.digest()


identifiers = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)


@SETTINGS
@given(st.sampled_from(SECTIONS + [""]), identifiers)
def test_unknown_keys_are_refused_with_their_dotted_path(section, key):
    assume(key not in _known(section))
    path = f"{section}.{key}" if section else key
    with pytest.raises(ConfigError) as info:
        apply_override(load_config("smoke"), f"{path}=1")
    assert str(info.value).startswith(path), str(info.value)
    # The same key in a YAML file.
    tree: dict = {key: 1} if not section else {section: {key: 1}}
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "c.yaml"
        file.write_text(yaml.safe_dump(tree))
        with pytest.raises(ConfigError) as info:
            load_config("smoke", file)
    assert path in str(info.value), str(info.value)


def _known(section: str) -> set[str]:
    if not section:
        return set(Config.model_fields)
    return set(Config.model_fields[section].annotation.model_fields)


@SETTINGS
@given(st.sampled_from(SECTIONS), identifiers, identifiers)
def test_a_key_below_a_leaf_or_an_unknown_section_is_refused(section, middle, leaf):
    assume(middle not in _known(section))
    path = f"{section}.{middle}.{leaf}"
    with pytest.raises(ConfigError) as info:
        apply_override(load_config("smoke"), f"{path}=1")
    assert f"{section}.{middle}" in str(info.value)


@SETTINGS
@given(field_and_value(wrong_values))
def test_wrong_types_are_refused_with_their_dotted_path(item):
    path, tp, value = item
    with pytest.raises(ConfigError) as info:
        apply_override(load_config("smoke"), f"{path}={as_yaml_value(value)}")
    assert str(info.value).startswith(path), (path, value, str(info.value))
    tree: dict = {}
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "c.yaml"
        file.write_text(yaml.safe_dump(tree))
        with pytest.raises(ConfigError) as info:
            load_config("smoke", file)
    assert str(info.value).startswith(path), (path, value, str(info.value))


folder_names = st.text(string.ascii_letters + string.digits + " #:!&*?,[]{}'\"%@`|>-_.~", min_size=1, max_size=16)


@FEW
@example("/scans/study #2")
@example("null")
@example("-0")
@given(folder_names)
def test_cli_data_path_is_taken_literally(name):
    from raysynth.cli import build_parser, resolve_config

    path = f"/data/{name}" if name[0] not in "/~" else name
    for given_path in (path, name):
        # A path that starts with "-" reads as an option to argparse (as to any CLI): it is given
        # as --data=PATH; every path works in that form.
        forms = [[f"--data={given_path}"]] + ([] if given_path.startswith("-") else [["--data", given_path]])
        for form in forms:
            args = build_parser().parse_args(["prepare", "--preset", "smoke", *form])
            assert resolve_config(args).data.source == given_path


# ---- picture loader ----------------------------------------------------------------------------


@st.composite
def picture_sets(draw):
    n_classes = draw(st.integers(2, 3))
    names = draw(st.lists(st.text(string.ascii_letters + string.digits + "_- ", min_size=1, max_size=8)
                          .filter(lambda s: s.strip() == s and not s.startswith("-")),
                          min_size=n_classes, max_size=n_classes, unique_by=str.lower))
    classes = {}
    for name in names:
        pics = []
        for _ in range(draw(st.integers(2, 4))):  # cv.folds=2: at least two subjects per class
            mode = draw(st.sampled_from(["L", "RGB", "RGBA", "I;16"]))
            fmt = draw(st.sampled_from(["PNG", "JPEG"] if mode in ("L", "RGB") else ["PNG"]))
            w, h = draw(st.integers(2, 40)), draw(st.integers(2, 40))
            seed = draw(st.integers(0, 2**32 - 1))
            pics.append((mode, fmt, w, h, seed))
        classes[name] = pics
    return classes


def _make_picture(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, w)[None, :] * np.linspace(0.2, 1, h)[:, None]  # structure survives JPEG
    base = np.clip(0.7 * ramp + 0.3 * rng.random((h, w)), 0, 1)
    if mode == "I;16":
        return Image.fromarray((base * 65535).astype(np.uint16))
    grey = (base * 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(grey)
    # Grey content stored as colour (as the 4-class JPEG set): data.channels=grey must take it; a
    # picture whose channels differ is an error there (tests/test_sources.py), not a property case.
    channels = [grey, grey, grey]
    if mode == "RGBA":
        channels.append(rng.integers(0, 256, (h, w), dtype=np.uint8))
    return Image.fromarray(np.stack(channels, axis=-1), mode)


def _decoded_is_constant(path: Path) -> bool:
    with Image.open(path) as im:
        arr = np.asarray(im if im.mode.startswith("I") else im.convert("L"), dtype=np.float64)
    return float(arr.max()) == float(arr.min())


@FEW
@given(picture_sets())
def test_prepare_gives_square_images_in_range_with_the_folder_labels(classes):
    from raysynth.stages.prepare import prepare
    from raysynth.data.schema import read_parquet
    from raysynth.artifacts import Layout, read_json

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        expected = {}
        for name, pics in classes.items():
            (root / name).mkdir(parents=True)
            for i, (mode, fmt, w, h, seed) in enumerate(pics):
                path = root / name / f"img{i}.{'png' if fmt == 'PNG' else 'jpg'}"
                _make_picture(mode, w, h, seed).save(path, format=fmt)
                assume(not _decoded_is_constant(path))
                expected[f"{name}/{path.name}"] = name
        cfg = load_config("smoke", overrides=["cv.folds=2", "data.duplicates=keep"])  # drawn pictures repeat across classes
        cfg.data.source = str(root)
        layout = Layout.at(Path(tmp) / "out")
        prepare(cfg, layout)
        fingerprint = read_json(layout.fingerprint)
        data = read_parquet(layout.data_parquet)
        size = cfg.data.image_size
        assert fingerprint["class_names"] == sorted(classes)
        assert data.images.shape == (len(expected), 1, size, size) and data.images.dtype == np.float32
        assert np.isfinite(data.images).all()
        assert data.images.min() >= -1.0 and data.images.max() <= 1.0
        source_of = {s["subject"]: s["path"] for s in fingerprint["sources"]}
        for subject, label in zip(data.subjects, data.labels):
            assert fingerprint["class_names"][label] == expected[source_of[subject]]
        assert fingerprint["counts"] == {n: len(p) for n, p in classes.items()}


# ---- NIfTI loader ------------------------------------------------------------------------------

AXCODES = [("R", "L"), ("A", "P"), ("S", "I")]


@st.composite
def nifti_volumes(draw):
    shape = tuple(draw(st.integers(2, 20)) for _ in range(3))
    spacing = [draw(st.floats(0.3, 4.0)) for _ in range(3)]
    dtype = draw(st.sampled_from(["float32", "float64", "int16", "uint8"]))
    # An orientation: which world axis each voxel axis runs along, and in which direction.
    order = draw(st.permutations([0, 1, 2]))
    flips = [draw(st.booleans()) for _ in range(3)]
    oblique = draw(st.floats(-25.0, 25.0))
    return {"shape": shape, "spacing": spacing, "dtype": dtype, "order": order, "flips": flips,
            "oblique": oblique, "origin": [draw(st.floats(-100, 100)) for _ in range(3)],
            "seed": draw(st.integers(0, 2**32 - 1)), "gz": draw(st.booleans())}


def _ras_data(spec) -> np.ndarray:
    rng = np.random.default_rng(spec["seed"])
    x = rng.normal(size=spec["shape"]) * 40 + 100
    x[tuple(s // 2 for s in spec["shape"])] += 500  # never constant, whatever the dtype
    if spec["dtype"] == "uint8":
        x = np.clip(x, 0, 255)
    return x.astype(spec["dtype"])


def _ras_affine(spec) -> np.ndarray:
    affine = np.diag(list(spec["spacing"]) + [1.0])
    affine[:3, 3] = spec["origin"]
    return affine


def _reoriented(data: np.ndarray, affine: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored in another voxel order: identical voxel-to-world mapping."""
    codes = tuple(AXCODES[axis][int(flip)] for axis, flip in zip(spec["order"], spec["flips"]))
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")),
                                           nib.orientations.axcodes2ornt(codes))
    out = nib.orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)


def _rotation_z(degrees: float) -> np.ndarray:
    t = math.radians(degrees)
    r = np.eye(4)
    r[:2, :2] = [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]
    return r


def _write_set(root: Path, items: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, data, affine) in enumerate(items):
        nib.save(nib.Nifti1Image(data, affine), root / name)
        rows.append(f"{name},{'ab'[i % 2]}")
    (root / "labels.csv").write_text("file,label\n" + "\n".join(rows) + "\n")


@FEW
@given(st.lists(nifti_volumes(), min_size=2, max_size=4), st.sampled_from([2, 3]))
def test_random_volumes_with_random_affines_preprocess_to_the_target_shape(specs, dims):
    from raysynth.config import DataConfig
    from raysynth.data.preprocess import preprocess
    from raysynth.data.sources import load_source

    items = []
    for i, spec in enumerate(specs):
        data, affine = _reoriented(_ras_data(spec), _ras_affine(spec), spec)
        affine = _rotation_z(spec["oblique"]) @ affine  # oblique: no voxel axis is exactly a world axis
        items.append((f"v{i}.nii{'.gz' if spec['gz'] else ''}", data, affine))
    with tempfile.TemporaryDirectory() as tmp:
        _write_set(Path(tmp), items)
        cfg = DataConfig(source=tmp, dims=dims, image_size=16)
        records = preprocess(load_source(cfg), cfg)
    assert records.images.shape == (len(specs), 1) + (16,) * dims
    assert records.images.dtype == np.float32 and np.isfinite(records.images).all()
    assert records.images.min() >= -1.0 and records.images.max() <= 1.0
    assert all(np.isfinite(s) and s > 0 for s in records.spacing)


@FEW
@given(nifti_volumes(), st.sampled_from([2, 3]))
def test_the_same_volume_in_any_orientation_gives_the_same_model_input(spec, dims):
    from raysynth.config import DataConfig
    from raysynth.data.preprocess import preprocess
    from raysynth.data.sources import load_source

    ras, affine = _ras_data(spec), _ras_affine(spec)
    other, other_affine = _reoriented(ras, affine, spec)
    with tempfile.TemporaryDirectory() as tmp:
        _write_set(Path(tmp), [("ras.nii.gz", ras, affine), ("other.nii", other, other_affine)])
        cfg = DataConfig(source=tmp, dims=dims, image_size=16)
        raw = load_source(cfg)
        records = preprocess(raw, cfg)
    by_name = {s.source: i for i, s in enumerate(raw.scans)}
    np.testing.assert_allclose(raw.scans[by_name["other.nii"]].spacing, raw.scans[by_name["ras.nii.gz"]].spacing, rtol=1e-5)
    np.testing.assert_allclose(records.images[by_name["other.nii"]], records.images[by_name["ras.nii.gz"]], atol=1e-5)
