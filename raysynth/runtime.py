"""Connecting to Ray, and per-process settings shared by every stage."""

from __future__ import annotations

import logging
import os

from raysynth.config import Config

log = logging.getLogger(__name__)

# Ray's own progress bars and chatter make stage logs unreadable in CI and job logs.
_QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_DEDUP_LOGS": "1",
}


def ensure_ray(cfg: Config) -> None:
    """Join the cluster named by ``ray.address`` or ``RAY_ADDRESS``, else start a local instance.

    Under ``ray job submit`` the driver runs on the cluster and ``RAY_ADDRESS`` is set for it,
    so the same code serves a laptop and a cloud cluster.
    """
    import ray

    if ray.is_initialized():
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
    quiet_ray_logs()
    res = ray.cluster_resources()
    log.info("ray: %s CPU, %s GPU available", res.get("CPU", 0), res.get("GPU", 0))


def quiet_ray_logs() -> None:
    """Our stages log their own progress; Ray Data's per-operator progress lines drown it."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    for name in ("ray.data", "ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)


def set_threads(num_cpus: float | int) -> None:
    """Match torch's intra-op threads to the CPUs Ray reserved for this worker (at least 1)."""
    import torch

    n = max(1, int(num_cpus))
    torch.set_num_threads(n)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts; stable across processes, Python versions and machines."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)
