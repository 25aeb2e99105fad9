"""Fault tolerance (issue 8): killed workers and drivers, and resuming without loss.

- Training: a Ray Train worker is SIGKILLed after its first checkpoint is registered; the run
  finishes from that checkpoint (``FailureConfig(max_failures)``) and its loss history carries
  on from it instead of starting again at step 0. The same after the *driver* (``raysynth train``
  in its own process, with its own local Ray) is SIGKILLed and the command is run again.
- Sampling: ``raysynth sample`` is SIGKILLed half-way and run again: exactly the requested count,
  no duplicate ids, no partial or temporary files, manifest checksums that match the images, and
  the shards finished before the kill are kept as they were (not rewritten).
- Study: a rerun after losing a trial's result runs only that trial; a trial whose worker process
  is SIGKILLed is retried (``FailureConfig(max_failures)``) and the study completes.

How "resumed, not restarted" is told apart: a generator's loss history rows carry wall-clock
``seconds_per_step``. The rows of the checkpoint registered before the kill are copied at kill
time; a resumed run continues that very history (the same rows, bit for bit), a restarted one
would rebuild rows 10, 20, ... with other timings. The worker's "resuming at step N" line is
checked as well.

Ray-heavy: marked slow. The killed driver runs in a subprocess with its own local Ray (no
RAY_ADDRESS); the rerun uses the session's shared Ray (``ray_session``), which is what a second
``raysynth`` command does too: any Ray will do, the state lives in OUT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysynth.cli import main
from raysynth.config import load_config
from raysynth.artifacts import Layout, read_json

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# Slow enough per step (batch 128) that the kill lands while training still runs, even on a fast
# idle machine: Ray Train's controller registers a reported checkpoint at its next poll (2 s).
TRAIN_STEPS = 40
TRAIN_SET = [f"diffusion.train_steps={TRAIN_STEPS}", "diffusion.checkpoint_every=10", "diffusion.log_every=10",
             "diffusion.max_failures=2", "diffusion.batch_size=128"]
# Many small, slow-ish shards (48 samples in 12 shards of 4, 100 DDIM steps each), one actor: the
# kill after the second shard leaves most of the set to do, even on a fast idle machine.
SAMPLE_SET = ["sampling.shard_size=4", "sampling.steps=100", "sampling.max_actors=1"]
NUM_SAMPLES = 48


# ---- helpers -----------------------------------------------------------------------------------


def _proc_parent_and_title(pid: int) -> tuple[int, bytes]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    return int(stat.rsplit(")", 1)[1].split()[1]), title


def _our_ray_workers(title_prefix: str) -> list[int]:
    """PIDs of this test process's Ray workers whose title (``ray::Class.method``) starts with
    ``title_prefix``. Read from /proc, no RPC, so it is quick enough to catch a short trial; the
    ancestry check (worker -> raylet -> this process) keeps other Ray instances on the machine,
    and their workers, out of it."""
    me, prefix, found = os.getpid(), title_prefix.encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent, title = _proc_parent_and_title(int(entry.name))
            if not title.startswith(prefix):
                continue
            for _ in range(6):  # worker -> raylet -> driver, a few hops at most
                if parent in (me, 0, 1):
                    break
                parent = _proc_parent_and_title(parent)[0]
        except (OSError, ValueError, IndexError):
            continue
        if parent == me:
            found.append(int(entry.name))
    return sorted(found)


def _worker_log_lines(needle: str) -> list[tuple[str, int, str]]:
    """``(file, line number, line)`` of each line containing ``needle`` in the shared Ray
    session's worker stdout files (the session runs with log_to_driver=False, so worker prints
    only land there). Positions, not texts, tell new lines from old: texts repeat across tests."""
    import ray._private.worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    if node is None:
        return []
    lines = []
    for path in Path(node.get_logs_dir_path()).glob("worker-*.out"):
        try:
            text = path.read_text(errors="replace").splitlines()
            lines += [(path.name, i, line) for i, line in enumerate(text) if needle in line]
        except OSError:
            pass
    return lines


def _registered_checkpoint(run_dir: Path) -> Optional[str]:
    """The latest checkpoint Ray Train's controller has registered for this run (its directory
    name), from the checkpoint manager snapshot it keeps in storage; None before the first."""
    try:
        state = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    latest = state.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return name if name and (run_dir / name / "history.json").is_file() else None


class Killer(threading.Thread):
    """Polls ``when()`` on the driver; once it returns something, SIGKILLs the process ``pid()``."""

    def __init__(self, when: Callable[[], object], pid: Callable[[], Optional[int]], timeout: float = 240.0):
        super().__init__(daemon=True)
        self.when, self.pid, self.timeout = when, pid, timeout
        self.killed: Optional[tuple[int, object]] = None
        self.error: Optional[BaseException] = None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline, pid = time.time() + self.timeout, None
        try:
            while not self.stop.is_set() and time.time() < deadline:
                pid = pid or self.pid()  # found early, so the kill is not late when the moment comes
                info = self.when() if pid else None
                if info:
                    os.kill(pid, signal.SIGKILL)
                    self.killed = (pid, info)
                    return
                time.sleep(0.05)
        except BaseException as exc:  # surfaced by the test, never lost in a thread
            self.error = exc


def _session_members(sid: int) -> list[int]:
    """PIDs whose session id is ``sid``: a subprocess started with start_new_session=True and
    everything it spawned (its local Ray: GCS, raylet, workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # after ")": state, ppid, pgrp, session
                pids.append(int(entry.name))
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a driver we started, then whatever of its own Ray outlived it (Ray's kernel fate
    sharing normally takes it down; this only makes sure), and wait until all of it is gone."""
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline:
        left = _session_members(proc.pid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of the killed driver survive: {_session_members(proc.pid)}")


def _start_cli(args: list[str], log: Path) -> subprocess.Popen:
    """``raysynth ARGS`` in its own process and session, starting its own local Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the session's Ray
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "raysynth.cli", *args], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


RAY_STARTUP_FAILED = "timed out during startup"
"""Ray's own start-up gives a raylet 30 s (hard-coded) to register; a heavily loaded CI machine
can miss that. Such a run never reached raysynth code, so it is started once more."""


def _start_and_wait(args: list[str], log: Path, predicate: Callable[[], object], what: str,
                    timeout: float = 300.0, attempts: int = 2) -> tuple[subprocess.Popen, object]:
    """Start ``raysynth ARGS`` and wait until ``predicate()`` holds; returns the still-running
    process (for the caller to kill) and the predicate's value."""
    for attempt in range(1, attempts + 1):
        proc = _start_cli(args, log)
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return proc, value
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        else:
            _kill_session(proc)
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        _kill_session(proc)  # exited early: reap what it left
        text = log.read_text(errors="replace")
        if RAY_STARTUP_FAILED not in text or attempt == attempts:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}:\n{text[-3000:]}")
    raise AssertionError("unreachable")


def _resumed_at(lines: list[tuple[str, int, str]]) -> int:
    return int(lines[-1][2].rsplit("resuming at step", 1)[1].split()[0])


def _history(layout: Layout, fold: int = 0) -> list[dict]:
    return [json.loads(line) for line in (layout.ddpm(fold) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _assert_resumed(layout: Layout, before_kill: list[dict], train_steps: int) -> None:
    """The finished history is continuous and continues the checkpoint taken before the kill."""
    history = _history(layout)
    steps = [row["step"] for row in history]
    assert steps == sorted(set(steps)), f"steps not strictly increasing (a restart?): {steps}"
    assert steps[-1] == train_steps and steps[0] == before_kill[0]["step"]
    assert read_json(layout.ddpm(0) / "config.json")["steps"] == train_steps
    kill_step = before_kill[-1]["step"]
    assert 0 < kill_step < train_steps, f"the kill came too late to test anything (step {kill_step})"
    # Rows up to the checkpoint are the killed run's own rows, timings included: resumed, not redone.
    assert history[: len(before_kill)] == before_kill, "the history before the kill was recomputed: restarted from 0?"
    assert len(history) > len(before_kill)


def _file_state(folder: Path, pattern: str = "part-*.parquet") -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.glob(pattern))}


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The smoke cohort, prepared once for this module (no Ray needed)."""
    from raysynth.stages.prepare import prepare

    out = tmp_path_factory.mktemp("ft-prepared")
    prepare(load_config("smoke"), Layout.at(out))
    return out / "prepared"


def _fresh_out(tmp_path: Path, prepared: Path) -> Layout:
    out = tmp_path / "out"
    shutil.copytree(prepared, out / "prepared")
    return Layout.at(out)


@pytest.fixture(scope="module")
def trained_fold0(ray_session, prepared, tmp_path_factory) -> Layout:
    """A smoke-preset generator for fold 0, trained once for the sampling test."""
    from raysynth.stages.train import train_generators

    layout = _fresh_out(tmp_path_factory.mktemp("ft-trained"), prepared)
    train_generators(load_config("smoke"), layout, folds=[0])
    return layout


# ---- training ----------------------------------------------------------------------------------


def test_killed_training_worker_resumes_from_its_last_checkpoint(ray_session, prepared, tmp_path):
    from raysynth.stages.train import run_name, train_generators

    cfg = load_config("smoke", overrides=TRAIN_SET)
    layout = _fresh_out(tmp_path, prepared)
    run_dir = layout.ray_storage / run_name(0)
    resumes_before = set(_worker_log_lines("[train fold 0] resuming at step"))
    before_kill: dict = {}

    def registered():
        name = _registered_checkpoint(run_dir)
        if name:  # copy the history now: the checkpoint may be rotated away later (num_to_keep=2)
            before_kill["history"] = json.loads((run_dir / name / "history.json").read_text())
        return name

    killer = Killer(registered, lambda: next(iter(_our_ray_workers("ray::RayTrainWorker")), None))
    killer.start()
    try:
        train_generators(cfg, layout, folds=[0])
    finally:
        killer.stop.set()
        killer.join(timeout=10)
    assert killer.error is None, repr(killer.error)
    assert killer.killed is not None, "training finished before its worker could be killed"
    _assert_resumed(layout, before_kill["history"], cfg.diffusion.train_steps)
    # The new worker said where it resumed: at the killed checkpoint or a later registered one.
    new = [line for line in _worker_log_lines("[train fold 0] resuming at step") if line not in resumes_before]
    assert new, "no 'resuming at step' line from the restarted worker"
    assert before_kill["history"][-1]["step"] <= _resumed_at(new) < cfg.diffusion.train_steps


def test_killed_training_driver_resumes_when_run_again(ray_session, prepared, tmp_path):
    from raysynth.stages.train import run_name

    layout = _fresh_out(tmp_path, prepared)
    run_dir = layout.ray_storage / run_name(0)
    args = ["train", "--preset", "smoke", "--out", str(layout.root), "--folds", "0"]
    for item in TRAIN_SET:
        args += ["--set", item]
    log = tmp_path / "driver.log"
    proc, name = _start_and_wait(args + ["--set", "ray.num_cpus=2"], log, lambda: _registered_checkpoint(run_dir),
                                 what="the first registered checkpoint")
    try:
        before_kill = json.loads((run_dir / name / "history.json").read_text())
    finally:
        _kill_session(proc)
    assert not (layout.ddpm(0) / "config.json").exists(), "the fold finished before its driver was killed"
    resumes_before = set(_worker_log_lines("[train fold 0] resuming at step"))
    assert main(args + ["-q"]) == 0  # the same command again (here on the session's Ray)
    _assert_resumed(layout, before_kill, TRAIN_STEPS)
    new = [line for line in _worker_log_lines("[train fold 0] resuming at step") if line not in resumes_before]
    assert new, "no 'resuming at step' line from the rerun's worker"
    assert before_kill[-1]["step"] <= _resumed_at(new) < TRAIN_STEPS


# ---- sampling ----------------------------------------------------------------------------------


def test_killed_sampling_job_completes_without_loss_when_run_again(trained_fold0, tmp_path):
    from raysynth.data.schema import checksum, read_parquet
    from raysynth.artifacts import SHARD_RE, sample_id

    layout = trained_fold0
    folder = layout.synthetic(0)
    args = ["sample", "--preset", "smoke", "--out", str(layout.root), "--folds", "0", "--num-samples", str(NUM_SAMPLES)]
    for item in SAMPLE_SET:
        args += ["--set", item]
    log = tmp_path / "sample.log"
    proc, _ = _start_and_wait(args + ["--set", "ray.num_cpus=2"], log,
                              lambda: len(list(folder.glob("part-*.parquet"))) >= 2, what="two finished shards")
    _kill_session(proc)
    kept = _file_state(folder)
    assert 2 <= len(kept) < NUM_SAMPLES // 4, f"the kill came too late to test anything: {sorted(kept)}"
    assert not (folder / "manifest.json").exists()
    for name in kept:  # whatever the kill left under a shard's name is a whole shard (atomic rename)
        assert SHARD_RE.match(name) and pq.read_table(folder / name).num_rows == 4, name

    assert main(args + ["-q"]) == 0  # run again: only the missing shards are generated

    manifest = read_json(folder / "manifest.json")
    assert manifest["num_samples"] == NUM_SAMPLES
    ids = [s["id"] for s in manifest["samples"]]
    assert len(set(ids)) == len(ids) == NUM_SAMPLES
    assert set(ids) == {sample_id(0, c, j) for c in (0, 1) for j in range(NUM_SAMPLES // 2)}
    assert sorted(manifest["shards"]) == sorted(p.name for p in folder.glob("part-*.parquet"))
    leftovers = [p.name for p in folder.iterdir() if "tmp" in p.name or (p.name.startswith(".") and p.is_file())]
    assert not leftovers, f"temporary or partial files left behind: {leftovers}"
    data = read_parquet([folder / s for s in manifest["shards"]])
    assert len(data) == NUM_SAMPLES and len(set(data.ids)) == NUM_SAMPLES
    recomputed = {sid: checksum(data.images[i], None if data.masks is None else data.masks[i])
                  for i, sid in enumerate(data.ids)}
    for sample in manifest["samples"]:
        assert sample["checksum"] == recomputed[sample["id"]], sample["id"]
    assert data.extra["checksum"] == [recomputed[sid] for sid in data.ids]  # and the shards' own column
    assert np.isfinite(data.images).all()
    now = _file_state(folder)
    for name, state in kept.items():  # shards finished before the kill were neither redone nor touched
        assert now[name] == state, name


# ---- study -------------------------------------------------------------------------------------

STUDY_SET = ["study.arms=[baseline]", "study.seeds=[0,1]", "study.epochs=1"]


def test_resumed_study_runs_only_the_missing_trial(ray_session, prepared, tmp_path, caplog):
    from raysynth.stages.study import run_study

    cfg = load_config("smoke", overrides=STUDY_SET)
    layout = _fresh_out(tmp_path, prepared)
    run_study(cfg, layout)
    trials = sorted((layout.study / "trials").glob("*.json"))
    assert len(trials) == 4  # 1 arm x 2 folds x 2 seeds
    lost, others = trials[1], {p.name: p.stat().st_mtime_ns for p in trials if p != trials[1]}
    lost.unlink()
    with caplog.at_level(logging.INFO, logger="raysynth.stages.study"):
        run_study(cfg, layout)
    assert lost.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in trials if p != lost} == others  # finished trials untouched
    assert any("1 to run" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert pq.read_table(layout.study / "results.parquet").num_rows == 4


def test_study_trial_whose_worker_is_killed_is_retried(ray_session, prepared, tmp_path):
    from raysynth.stages.study import run_study

    cfg = load_config("smoke", overrides=STUDY_SET + ["study.seeds=[0]", "study.epochs=2", "study.max_failures=2"])
    layout = _fresh_out(tmp_path, prepared)
    trials_dir = layout.study / "trials"
    killer = Killer(lambda: True, lambda: next(iter(_our_ray_workers("ray::ImplicitFunc.train")), None))
    killer.start()
    try:
        run_study(cfg, layout)  # raises StageError if a trial failed for good
    finally:
        killer.stop.set()
        killer.join(timeout=10)
    assert killer.error is None, repr(killer.error)
    assert killer.killed is not None, "no trial worker was seen alive to be killed"
    assert len(list(trials_dir.glob("*.json"))) == 2  # 1 arm x 2 folds x 1 seed: the killed one too
    assert pq.read_table(layout.study / "results.parquet").num_rows == 2
    # Tune recorded the failure it recovered from, in the trial's folder.
    errors = list(layout.ray_storage.glob("study_*/*/error.txt"))
    assert errors, "no trial recorded an error: the kill did not hit a running trial"
