"""Shared fixtures: one local Ray instance per test session, an isolated cohort cache, one torch thread,
and the smoke pipeline run once as a user runs it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


@pytest.fixture(scope="session", autouse=True)
def cohort_cache(tmp_path_factory):
    """Keep the embedded cohort cache out of the user's home during tests."""
    path = tmp_path_factory.mktemp("cohort-cache")
    old = os.environ.get("RAYSYNTH_CACHE")
    os.environ["RAYSYNTH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("RAYSYNTH_CACHE", None)
    else:
        os.environ["RAYSYNTH_CACHE"] = old


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once and shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def one_thread():
    """Tiny tensors: extra intra-op threads only contend with whatever else runs on the machine.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[1]


def kill_processes_under(marker: str) -> None:
    """SIGKILL every process whose command line mentions ``marker`` (a Ray instance's own temp dir)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(scope="session")
def smoke_cli(tmp_path_factory, cohort_cache):
    """``python -m raysynth.cli pipeline --preset smoke --out OUT``, once per session, as a user runs it:
    a subprocess with its own Ray (its own temp dir, no RAY_ADDRESS, so it neither joins nor disturbs
    the session's instance), stdout and stderr captured together, not on a terminal.
    ``test_pipeline_e2e`` checks its artifacts, ``test_console`` its console. Returns ``out``,
    ``returncode``, ``output`` (the console text) and ``seconds``."""
    out = tmp_path_factory.mktemp("smoke")
    ray_tmp = tempfile.mkdtemp(prefix="rsc-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAYSYNTH_CACHE=str(cohort_cache))
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "raysynth.cli", "pipeline", "--preset", "smoke", "--out", str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=1800)
        yield SimpleNamespace(out=out, returncode=proc.returncode, output=proc.stdout, seconds=time.time() - t0)
    finally:
        kill_processes_under(ray_tmp)  # only if the run left any: it shuts its Ray down itself
        shutil.rmtree(ray_tmp, ignore_errors=True)
