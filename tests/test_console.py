"""What a user sees: the smoke pipeline's console, run as a user runs it (``conftest.smoke_cli``, the
subprocess ``test_pipeline_e2e`` checks the artifacts of), and the console's parts on their own."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap

import pytest

from raysynth import console as con
from raysynth.cli import main
from raysynth.console import Console, Progress, format_seconds, one_line
from raysynth.errors import StageError
from raysynth.pipeline import STAGES

RAY_MARKERS = ("TrainController", "RayTrainWorker", "core_worker.cc", "repeated", "pid=")
"""Ray's controller, worker and core-worker lines and its dedup notices: never on the console by default."""


@pytest.mark.slow
def test_the_smoke_pipeline_console_is_short_and_free_of_ray_output(smoke_cli):
    text = smoke_cli.output
    assert smoke_cli.returncode == 0, text[-3000:]
    lines = [line for line in text.splitlines() if line.strip()]
    print(f"smoke pipeline: {len(lines)} console lines in {smoke_cli.seconds:.0f}s")
    leaked = [line for line in lines if any(marker in line for marker in RAY_MARKERS)]
    assert not leaked, "\n".join(leaked)
    for noise in ("Token authentication", "View detailed results", "tensorboard", "Traceback", "Exception ignored",
                  "Configuration for experiment", "WARNING"):
        assert noise not in text, noise
    assert len(lines) <= 60, text
    for stage in (s for s in STAGES if s != "autoencoder"):  # one line at each end of every stage that runs
        # (the autoencoder runs in latent space only, and smoke is pixel space)
        assert sum(line.endswith(f"== {stage}") for line in lines) == 1, stage
        assert any(f"== {stage} done in " in line and str(smoke_cli.out) in line for line in lines), stage
    for bar in ("train", "sample", "study", "robustness"):  # each long part ends with its final progress line
        assert any(f" {bar}: " in line and "(100%)" in line and " done in " in line for line in lines), bar
    log = smoke_cli.out / "logs" / "ray.log"
    assert f"Ray's output and details: {log}" in text
    details = log.read_text()
    assert "[train fold 0] step 30/30" in details and "pid=" in details  # Ray's output is kept, in the file
    assert "study: 4/4 trials done" in details  # and our per-trial lines
    assert "== autoencoder" not in text
    assert sum("estimate from a 3-step calibration on this machine: about" in line for line in lines) == 1


def test_progress_without_a_terminal_logs_bounded_lines(caplog):
    with caplog.at_level(logging.INFO, logger="raysynth.progress"):
        with Progress("work", 100, "items", line_seconds=3600) as bar:
            for _ in range(100):
                bar.update()
        assert [r.getMessage() for r in caplog.records][-1].startswith("work: 100/100 items (100%)")
        assert len(caplog.records) == 1  # nothing but the final line within the interval
        caplog.clear()
        with pytest.raises(RuntimeError):
            with Progress("work", 10, "items", line_seconds=0) as bar:
                bar.note("fold 0 3/10")
                bar.set(3)  # the first advance (a resumed count, say): the rate is counted from here
                bar.set(5)
                bar.set(5)  # no advance, no line
                raise RuntimeError("boom")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("work: 3/10 items (30%)") and "elapsed" in messages[0] and "fold 0 3/10" in messages[0]
    assert messages[1].startswith("work: 5/10 items (50%)") and "ETA" in messages[1]
    assert len(messages) == 3 and "stopped in" in messages[-1]


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 45.4, 125, 3725)] == ["0s", "45s", "2m05s", "1h02m"]


def test_one_line_unwraps_ray_errors():
    class TaskError(Exception):  # the shape of ray.exceptions.RayTaskError: the cause on .cause
        def __init__(self, cause):
            super().__init__("ray::_fit_fold() (pid=1, ip=x)\nTraceback (most recent call last):\n  ...")
            self.cause = cause

    class GroupError(Exception):  # the shape of ray.train.WorkerGroupError
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors:\n[Rank 0]\n...")
            self.worker_failures = failures

    assert one_line(TaskError(StageError("train: fold 1 finished without a checkpoint"))) == \
        "train: fold 1 finished without a checkpoint"
    assert one_line(GroupError({0: ValueError("bad shape\nmore")})) == "ValueError: bad shape"
    assert one_line(KeyError("diffusion.steps")) == "KeyError: 'diffusion.steps'"


SCRIPT = textwrap.dedent("""
    import logging, os, sys
    from raysynth.console import Console, Progress
    ray_logger = logging.getLogger("ray")  # as Ray sets it up: its own handler on stderr, no propagation
    ray_logger.addHandler(logging.StreamHandler())
    ray_logger.propagate = False
    with Console(sys.argv[1], title="test") as c:
        logging.getLogger("raysynth.test").info("ours")
        logging.getLogger("raysynth.test").debug("our detail")
        print("a library's print")
        sys.stderr.write("a traceback line\\n")
        os.write(2, b"[E core_worker.cc:1] a C++ line\\n")
        logging.getLogger("ray").warning("a Ray banner")
        with Progress("work", 2, "items") as bar:
            bar.update(2)
        print("for the person", file=c.stdout)
    print("after")
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_console_routes_everything_but_ours_to_the_log(tmp_path, verbose):
    """In a subprocess: the descriptors themselves are redirected, which pytest's own capture would hide."""
    log = tmp_path / "logs" / "ray.log"
    script = SCRIPT.replace('title="test"', f'title="test", verbose={verbose}')
    shown = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    screen, kept = shown.stdout + shown.stderr, log.read_text()
    for line in ("ours", "work: 2/2 items (100%)", "for the person", "after"):
        assert line in screen, line
    for line in ("a library's print", "a traceback line", "core_worker.cc", "a Ray banner"):
        assert (line in screen) == verbose, line
        if not verbose:
            assert line in kept, line
    assert "our detail" in kept and ("our detail" in screen) == verbose
    assert "raysynth test" in kept and "INFO raysynth.test: ours" in kept


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_progress_is_a_bar_and_not_a_line(tmp_path, monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    with Console(tmp_path / "ray.log"):
        assert con._STATE.bars
        with Progress("work", 4, "items") as bar:
            bar.note("fold 0")
            bar.update(4)
    assert not con._STATE.bars
    shown = screen.getvalue()
    assert "work: 100%" in shown and "4/4" in shown and "items/s" in shown and "\r" in shown
    assert "work: 4/4 items (100%)" not in shown  # the plain line goes to the log only
    assert "work: 4/4 items (100%)" in (tmp_path / "ray.log").read_text()


def test_a_failed_stage_names_the_log_in_its_one_error_line(tmp_path, capsys):
    assert main(["train", "--preset", "smoke", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    log = tmp_path / "logs" / "ray.log"
    assert len(lines) == 1 and lines[0].startswith("raysynth: error: ") and f"(details: {log})" in lines[0], captured.err
    assert "== train" in captured.out and "== train failed after" in captured.out
    assert "raysynth: error:" in log.read_text()  # and the log holds it, with the stage's lines
