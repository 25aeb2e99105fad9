"""Shared fixtures: one local Ray instance per test session, an isolated cohort cache, one torch thread."""

from __future__ import annotations

import os

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
