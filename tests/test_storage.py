"""Output URIs: a staging folder synchronised with a pyarrow filesystem, tested through ``file://``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from raysynth.cli import main
from raysynth.artifacts import Layout
from raysynth.storage import RemoteOutput, StorageError, _within, is_uri, staging_dir, syncs_output

FILES = {"prepared/data.parquet": b"p" * 3000, "prepared/splits.json": b"[1, 2]",
         "ddpm/fold_0/checkpoint/model.safetensors": b"w" * 5000, "report/report.md": b"# report\n"}


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _tree(root: Path, skip: str = "\0") -> dict[str, bytes]:
    return {rel: p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not (rel := p.relative_to(root).as_posix()).startswith(skip)}


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def bucket(tmp_path):
    """A 'bucket' reached through a file:// URI, and a staging folder for it."""
    target = tmp_path / "bucket" / "run1"
    return f"file://{target}", target, tmp_path / "staging-a"


def test_uri_detection_and_staging_folder(monkeypatch, tmp_path):
    assert is_uri("s3://b/run1") and is_uri("gs://b/x") and is_uri("file:///tmp/x")
    assert not is_uri("runs/smoke") and not is_uri("/mnt/raysynth/run1") and not is_uri("~/out")
    monkeypatch.setenv("RAYSYNTH_STAGING", str(tmp_path / "st"))
    a, b = staging_dir("s3://bucket/run1"), staging_dir("s3://other/run1")
    assert a != b and a.parent == b.parent == tmp_path / "st" and a.name.startswith("run1-")
    assert staging_dir("s3://bucket/run1/") == a  # a trailing slash names the same output
    layout = Layout.at("s3://bucket/run1")
    assert layout.root == a and layout.remote == "s3://bucket/run1" and layout.location == "s3://bucket/run1"
    local = Layout.at(tmp_path / "out")
    assert local.remote is None and local.location == str(tmp_path / "out")


def test_push_copies_the_staging_folder_to_the_uri(bucket):
    uri, target, staging = bucket
    _write(staging, FILES)
    stats = RemoteOutput(uri, staging).push()
    assert _tree(target) == FILES
    assert (stats.copied, stats.unchanged, stats.bytes) == (len(FILES), 0, sum(map(len, FILES.values())))
    assert staging.with_name("staging-a.sync.json").is_file()  # the record lives beside the folder,
    assert not list(staging.rglob("*.sync.json"))  # never inside it, so it is never pushed


def test_push_is_incremental(bucket):
    uri, target, staging = bucket
    _write(staging, FILES)
    remote = RemoteOutput(uri, staging)
    remote.push()
    before = _mtimes(target)
    time.sleep(0.05)
    assert remote.push().copied == 0  # nothing changed: nothing copied, nothing rewritten
    assert _mtimes(target) == before

    (staging / "prepared/splits.json").write_bytes(b"[3, 4]")  # same size, new content
    os.utime(staging / "prepared/splits.json", ns=(time.time_ns() + 10**9,) * 2)
    _write(staging, {"quality/quality.json": b"{}"})
    stats = remote.push()
    assert (stats.copied, stats.unchanged) == (2, len(FILES) - 1)
    assert (target / "prepared/splits.json").read_bytes() == b"[3, 4]"
    assert (target / "quality/quality.json").read_bytes() == b"{}"
    after = _mtimes(target)
    for rel in set(FILES) - {"prepared/splits.json"}:
        assert after[rel] == before[rel], f"{rel} was re-copied although unchanged"


def test_a_fresh_staging_folder_resumes_from_the_uri(bucket, tmp_path):
    uri, target, staging = bucket
    _write(staging, FILES)
    RemoteOutput(uri, staging).push()

    fresh = tmp_path / "staging-b"  # another machine: nothing local
    remote = RemoteOutput(uri, fresh)
    stats = remote.pull()
    assert _tree(fresh) == FILES and stats.copied == len(FILES)
    assert remote.pull().copied == 0  # incremental both ways
    assert remote.push().copied == 0  # what was pulled is not pushed back


def test_pull_takes_changes_in_the_uri_and_keeps_unsynced_local_work(bucket, tmp_path):
    uri, target, staging = bucket
    _write(staging, FILES)
    a = RemoteOutput(uri, staging)
    a.push()
    b = RemoteOutput(uri, tmp_path / "staging-b")
    b.pull()
    _write(tmp_path / "staging-b", {"report/report.md": b"# newer report, longer\n"})
    b.push()  # machine b changed a file in the bucket

    _write(staging, {"study/trials/t1.json": b"{}"})  # machine a's unpushed work
    stats = a.pull()
    assert stats.copied == 1 and (staging / "report/report.md").read_bytes() == b"# newer report, longer\n"
    assert (staging / "study/trials/t1.json").read_bytes() == b"{}"


def test_deletions_propagate_but_never_touch_files_this_folder_did_not_sync(bucket):
    uri, target, staging = bucket
    _write(staging, FILES)
    remote = RemoteOutput(uri, staging)
    remote.push()
    _write(target, {"from-elsewhere.txt": b"not ours"})
    (staging / "report/report.md").unlink()  # e.g. a stage rerun with --force removed it
    stats = remote.push()
    assert stats.deleted == 1 and not (target / "report/report.md").exists()
    assert (target / "from-elsewhere.txt").read_bytes() == b"not ours"


@pytest.mark.parametrize("uri,needle", [("nosuch://bucket/run1", "cannot reach"),
                                        ("file://{tmp}/a-file", "is a file, not a folder")])
def test_bad_uri_is_one_clear_line(tmp_path, uri, needle):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StorageError) as err:
        RemoteOutput(uri.format(tmp=tmp_path), tmp_path / "st")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unreachable_object_store_is_one_clear_line(tmp_path):
    # An S3 endpoint where nothing listens: what a wrong endpoint or a blocked network looks like.
    uri = "s3://bucket/run1?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    with pytest.raises(StorageError) as err:
        RemoteOutput(uri, tmp_path / "st")
    msg = str(err.value)
    assert msg.startswith("output s3://bucket/run1") and "cannot reach" in msg and "credentials" in msg
    assert "\n" not in msg


def test_a_filesystem_that_never_answers_times_out():
    with pytest.raises(StorageError, match="no answer .* within 1s"):
        _within(1, lambda: time.sleep(30), "gs://bucket/run1")
    assert _within(5, lambda: 42, "gs://bucket/run1") == 42


def test_a_failed_stage_still_pushes_its_partial_output(bucket, monkeypatch, tmp_path):
    uri, target, _ = bucket
    monkeypatch.setenv("RAYSYNTH_STAGING", str(tmp_path / "st"))
    layout = Layout.at(uri)

    @syncs_output
    def stage(name, cfg, layout):
        _write(layout.root, {"ddpm/fold_0/config.json": b"{}"})  # one fold finished ...
        raise RuntimeError("fold 1 crashed")  # ... then the stage failed

    with pytest.raises(RuntimeError, match="fold 1 crashed"):
        stage("train", None, layout)
    assert (target / "ddpm/fold_0/config.json").read_bytes() == b"{}"


def test_cli_prepare_writes_to_the_uri_and_a_fresh_machine_resumes(tmp_path, monkeypatch, capsys):
    target = tmp_path / "bucket" / "run1"
    uri = f"file://{target}"
    monkeypatch.setenv("RAYSYNTH_STAGING", str(tmp_path / "machine-a"))
    assert main(["prepare", "--preset", "smoke", "--out", uri, "-q"]) == 0
    out = capsys.readouterr().out
    assert f"output in {uri}" in out
    for rel in ("prepared/data.parquet", "prepared/fingerprint.json", "prepared/splits.json"):
        assert (target / rel).is_file(), rel
    staged = staging_dir(uri)
    assert (staged / "logs" / "ray.log").is_file() and not (target / "logs").exists()  # the log stays local
    assert _tree(staged, skip="logs/") == _tree(target)

    pushed = _mtimes(target)
    monkeypatch.setenv("RAYSYNTH_STAGING", str(tmp_path / "machine-b"))  # a fresh machine, same URI
    assert main(["prepare", "--preset", "smoke", "--out", uri, "-q"]) == 0
    assert _tree(staging_dir(uri), skip="logs/") == _tree(target)
    assert _mtimes(target) == pushed  # prepare found its artifact complete: nothing redone, nothing re-pushed


def test_cli_unreachable_uri_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYSYNTH_STAGING", str(tmp_path / "st"))
    code = main(["prepare", "--preset", "smoke", "--out", "nosuch://bucket/run1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("raysynth: error: output nosuch://bucket/run1: cannot reach") and err.count("\n") == 1
