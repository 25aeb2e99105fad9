"""Connecting to Ray, and per-process settings shared by every stage."""

from __future__ import annotations

import logging
import os

from raysynth.config import Config

log = logging.getLogger(__name__)

# Ray's own progress bars and chatter make stage logs unreadable in CI and job logs. Tune's new
# output engine prints its experiment table and "View detailed results here" even at verbose=0;
# the classic reporter at verbose=0 prints nothing (our stages log their own progress).
_QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
}
_STARTED_HERE = False
"""Whether :func:`ensure_ray` initialised Ray in this process (so :func:`release_ray` may shut it down)."""

OPENMP_ENV = {"GOMP_SPINCOUNT": "1000"}
"""How long torch's OpenMP threads in a locally started Ray's workers spin at a barrier before they sleep.

libgomp (the OpenMP runtime of torch's CPU wheels) spins 300000 times (about 3 ms) by default; on
a machine shared with other jobs a worker with 2 threads then burns the CPU time its descheduled
partner needs, and ran several times slower than with 1 thread. 1000 spins (about 10 us) kept most
of the gain of ``OMP_WAIT_POLICY=PASSIVE`` under load without PASSIVE's cost on an idle machine
(``bench/omp_wait.py``; figures in BENCHMARKS.md, issue 9). 1-thread workers, the default of every
stage, run no OpenMP barriers and are unaffected.
"""


def openmp_env() -> dict[str, str]:
    """:data:`OPENMP_ENV`, unless the environment already chooses a wait policy or spin count."""
    if {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        return {}
    return dict(OPENMP_ENV)


def ensure_ray(cfg: Config) -> None:
    """Join the cluster named by ``ray.address`` or ``RAY_ADDRESS``, else start a local instance.

    Under ``ray job submit`` the driver runs on the cluster and ``RAY_ADDRESS`` is set for it,
    so the same code serves a laptop and a cloud cluster.

    Workers' output is forwarded to this driver (``log_to_driver``, from every node of a cluster);
    the command line's :class:`raysynth.console.Console` sends it, with the rest of Ray's output, to
    ``OUT/logs/ray.log`` rather than the terminal.

    A local instance's workers inherit :func:`openmp_env` from this process: libgomp reads it when
    torch is imported, so it must be in a worker's environment before it starts (``set_threads`` runs
    too late). A cluster's nodes keep their own environment: a job-wide ``runtime_env`` would carry
    it there, but it added 0.3 s to every actor start here (0.41 -> 0.71 s), so set it on the nodes.
    """
    import ray

    global _STARTED_HERE
    if ray.is_initialized():
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.update(openmp_env())  # before ray.init: the raylet and its workers inherit it
        ray.init(num_cpus=cfg.ray.num_cpus, **kwargs)
    _STARTED_HERE = True
    quiet_ray_logs()
    res = ray.cluster_resources()
    log.info("ray: %s CPU, %s GPU available", res.get("CPU", 0), res.get("GPU", 0))


def release_ray() -> None:
    """Shut Ray down if :func:`ensure_ray` started or joined it here (not a caller's own ``ray.init``):
    the command line does this before it closes its console, so what Ray prints on the way out
    (workers stopped with SIGTERM) lands in the log file, not on the terminal."""
    global _STARTED_HERE
    if not _STARTED_HERE:
        return
    import ray

    _STARTED_HERE = False
    if ray.is_initialized():
        ray.shutdown()


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16) and PyTorch uses its
    AVX-512 kernels (``ATEN_CPU_CAPABILITY=avx2`` turns them off, and with them the gain). Read
    from the flags Linux reports; False where there are none to read."""
    import torch

    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return False
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and capability.startswith(("AVX512", "AMX"))


def use_cpu_bf16(setting: bool | str) -> bool:
    """``diffusion.cpu_bf16`` / ``sampling.cpu_bf16`` resolved on this machine: ``auto`` detects."""
    return cpu_has_native_bf16() if setting == "auto" else bool(setting)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integer parts; stable across processes, Python versions and machines."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)
