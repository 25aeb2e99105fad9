"""The command line: config printing, one-line errors with non-zero exits, nothing half-written."""

from __future__ import annotations

import pytest
import yaml
from PIL import Image

from raysynth.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_prints_resolved_yaml(capsys):
    code, out, _ = run(capsys, "config", "--preset", "smoke", "--set", "sampling.ratio=3", "--dims", "3")
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["sampling"]["ratio"] == 3.0 and cfg["data"]["dims"] == 3 and cfg["data"]["image_size"] == 16


def _png(path, value=128, size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


def _class_folder(root, classes=("a", "b"), n=4):
    for c in classes:
        for i in range(n):
            img = Image.effect_noise((24, 20), 40 + 10 * i)
            (root / c).mkdir(parents=True, exist_ok=True)
            img.save(root / c / f"img{i}.png")
    return root


def _bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = _class_folder(tmp_path / "corrupt")
    (corrupt / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    single = _class_folder(tmp_path / "single", classes=("only",))
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    (nifti / "labels.csv").write_text("file,label\nabsent.nii.gz,0\nalso_absent.nii.gz,1\n")
    return {
        "missing folder": (tmp_path / "nope", "nope"),
        "empty folder": (empty, "empty"),
        "corrupt image": (corrupt, "broken.png"),
        "one class": (single, "class"),
        "labels.csv names absent files": (nifti, "absent.nii.gz"),
    }


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "corrupt image", "one class",
                                  "labels.csv names absent files"])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, case):
    data, needle = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    code, _, err = run(capsys, "prepare", "--preset", "smoke", "--data", str(data), "--out", str(out))
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("raysynth: error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err
    assert not (out / "prepared" / "data.parquet").exists()
    assert not (out / "prepared" / "fingerprint.json").exists()


def test_bad_config_value_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "prepare", "--preset", "smoke", "--set", "sampling.sampler=magic", "--out", str(tmp_path))
    assert code == 2 and "sampling.sampler: 'magic' is not valid" in err


def test_later_stage_without_earlier_artifact_explains(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--preset", "smoke", "--out", str(tmp_path))
    assert code == 2 and "prepare" in err


def test_class_folder_prepares(capsys, tmp_path):
    data = _class_folder(tmp_path / "imgs", classes=("x", "y"), n=6)
    code, _, _ = run(capsys, "prepare", "--preset", "smoke", "--data", str(data), "--out", str(tmp_path / "o"),
                     "--set", "cv.folds=2")
    assert code == 0
    assert (tmp_path / "o" / "prepared" / "splits.json").is_file()


def test_version_names_the_libraries(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("raysynth ")
    assert all(f"{name} " in out for name in ("ray", "torch", "diffusers", "monai"))


def test_config_diff_prints_only_what_differs(capsys):
    assert main(["config", "--diff"]) == 0
    assert capsys.readouterr().out.strip() == "{}"
    assert main(["config", "--preset", "smoke", "--diff", "--set", "study.epochs=7"]) == 0
    changed = yaml.safe_load(capsys.readouterr().out)
    assert changed["study"]["epochs"] == 7 and changed["data"]["image_size"] == 16
    assert "source" not in changed["data"] and "task" not in changed["data"]  # unchanged keys stay out
