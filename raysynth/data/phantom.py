"""The embedded cohort: many simulated scans of one healthy brain, about half with a focal lesion.

The paper's public set is 557 T1 scans of a single subject. We simulate that without a download
from the MNI152 2009 template and its tissue maps, which ship inside nilearn's wheel. Each scan is
the template seen by a slightly different acquisition:

1. a small random rigid motion plus a smooth elastic warp (one coordinate map, applied to the
   intensities and to the tissue labels alike, so masks move with the image);
2. in about ``lesion_fraction`` of scans, a smooth ellipsoidal blob, brighter or darker than white
   matter, centred deep in white matter (for 2D: inside the slice itself);
3. the scanner: point-spread blur, a gamma contrast change, a smooth multiplicative bias field,
   a gain into integer "scanner units" and Rician noise.

2D scans are one axial plane through the lateral ventricles; 3D scans are volumes in RAS voxel
order ``(X, Y, Z)``. 2D planes are ``(rows, cols)`` = (anterior to posterior, patient left to
right), the same view :mod:`raysynth.data.sources` cuts from NIfTI volumes.
Tissue labels: 0 background, 1 CSF, 2 grey matter, 3 white matter, 4 lesion.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from raysynth.data.raw import RawScan, RawSet, grid_affine
from raysynth.io import atomic_path

logger = logging.getLogger(__name__)

PHANTOM_VERSION = 1
"""Bump when the simulation changes: it is part of the cache key."""
CLASS_NAMES = ["healthy", "lesion"]
TISSUE_NAMES = ["background", "csf", "grey_matter", "white_matter", "lesion"]
LESION = 4
_MARGIN_MM = 6.0


@dataclass(frozen=True)
class Scanner:
    """Ranges from which each scan draws its acquisition. ``(lo, hi)`` pairs are uniform ranges."""

    gamma: tuple[float, float]  # contrast: intensity ** gamma
    noise: tuple[float, float]  # Rician sigma as a fraction of the white-matter signal
    bias: float  # std of the log bias field at its control points
    blur: tuple[float, float]  # point-spread Gaussian sigma in native voxels
    gain: tuple[float, float]  # template units -> scanner units
    voxel_scale: float  # native voxel size relative to the default scanner (> 1: coarser)
    stream: int  # seed stream: the external scanner never shares random numbers with the cohort


SCANNERS = {
    False: Scanner(gamma=(0.8, 1.25), noise=(0.01, 0.04), bias=0.12, blur=(0.0, 0.3), gain=(600.0, 1400.0),
                   voxel_scale=1.0, stream=0),
    # Another site: flatter contrast, more noise and bias, a coarser and blurrier acquisition.
    True: Scanner(gamma=(0.55, 0.75), noise=(0.04, 0.07), bias=0.25, blur=(0.6, 1.0), gain=(2500.0, 4000.0),
                  voxel_scale=1.3, stream=1),
}


# ---- the template --------------------------------------------------------------------------


@dataclass
class _Anatomy:
    t1: np.ndarray        # template T1 in [0, 1], template voxel grid
    labels: np.ndarray    # uint8 tissue labels 0..3 on the same grid
    affine: np.ndarray    # template voxel -> MNI mm
    lo_mm: np.ndarray     # brain bounding box (with margin) in MNI mm, per axis
    hi_mm: np.ndarray
    ventricle_z_mm: float
    wm_level: float       # mean T1 of white matter: the reference for lesion and noise levels


@functools.lru_cache(maxsize=2)
def _anatomy(resolution: int) -> _Anatomy:
    from nilearn import datasets  # heavy import, and only needed on a cache miss

    t1_img = datasets.load_mni152_template(resolution=resolution)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).dataobj, dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).dataobj) > 0
    # nilearn ships no CSF map: inside the brain mask, what is neither grey nor white is CSF.
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    labels[~brain] = 0
    affine = t1_img.affine
    idx = np.argwhere(brain)
    lo = affine[:3, :3] @ idx.min(0) + affine[:3, 3] - _MARGIN_MM
    hi = affine[:3, :3] @ idx.max(0) + affine[:3, 3] + _MARGIN_MM
    # The axial level through the bodies of the lateral ventricles: most CSF in a central box.
    ijk = np.indices(t1.shape[:2]).reshape(2, -1)
    xy = affine[:2, :2] @ ijk + affine[:2, 3:4]
    central = ((np.abs(xy[0]) < 30) & (xy[1] > -40) & (xy[1] < 30)).reshape(t1.shape[:2])
    z_index = int(np.argmax((csf * central[..., None]).sum(axis=(0, 1))))
    z_mm = float(affine[2, 2] * z_index + affine[2, 3])
    return _Anatomy(t1, labels, affine, lo, hi, z_mm, float(t1[labels == 3].mean()))


@functools.lru_cache(maxsize=4)
def _smoothed_t1(resolution: int, voxel_mm: float) -> np.ndarray:
    """The template low-passed for a coarser grid, so sampling it does not alias."""
    template_mm = float(resolution)
    ratio = voxel_mm / template_mm
    sigma = 0.5 * np.sqrt(max(ratio**2 - 1.0, 0.0))
    t1 = _anatomy(resolution).t1
    return ndimage.gaussian_filter(t1, sigma) if sigma > 0 else t1


# ---- geometry ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The native grid a scan is simulated on."""

    dims: int
    shape: tuple[int, ...]
    voxel_mm: float
    resolution: int  # template resolution sampled (1 or 2 mm)


def native_geometry(image_size: int, dims: int, shifted: bool = False) -> Geometry:
    """Native grid: about 1.5x ``image_size`` on the long side (3D: at most 64), isotropic voxels."""
    if dims not in (2, 3):
        raise ValueError(f"dims: {dims!r} is not valid; choose one of [2, 3]")
    if image_size < 8:
        raise ValueError(f"image_size: {image_size} must be >= 8")
    long_side = round(1.5 * image_size) if dims == 2 else min(round(1.5 * image_size), 64)
    # The brain box is fixed by the template; 2 mm voxels bound it, so probe it at 2 mm first.
    extent = _anatomy(2).hi_mm - _anatomy(2).lo_mm
    voxel = float(extent.max() / long_side) * SCANNERS[shifted].voxel_scale
    resolution = 1 if voxel < 1.5 else 2
    axes = (1, 0) if dims == 2 else (0, 1, 2)  # 2D rows run along y (A-P), columns along x
    shape = tuple(int(np.ceil(extent[a] / voxel)) for a in axes)
    return Geometry(dims, shape, voxel, resolution)


def _grid_mm(geo: Geometry, anat: _Anatomy) -> np.ndarray:
    """MNI mm of each native voxel centre, relative to the brain centre: ``(3, *shape)``."""
    offsets = [(np.arange(n) - (n - 1) / 2.0) * geo.voxel_mm for n in geo.shape]
    if geo.dims == 3:
        return np.stack(np.meshgrid(*offsets, indexing="ij"))
    rows, cols = np.meshgrid(*offsets, indexing="ij")
    centre_z = anat.ventricle_z_mm - (anat.lo_mm[2] + anat.hi_mm[2]) / 2.0
    return np.stack([cols, -rows, np.full_like(rows, centre_z)])  # anterior at the top row


@functools.lru_cache(maxsize=16)
def _spline_basis(n: int, ctrl: int) -> np.ndarray:
    """``(n, ctrl)`` weights of cubic B-spline interpolation from ``ctrl`` points onto ``n``."""
    coords = np.linspace(0, ctrl - 1, n)[None]
    return np.stack([ndimage.map_coordinates(np.eye(ctrl)[k], coords, order=3, mode="nearest")
                     for k in range(ctrl)], axis=1)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], ctrl: int = 4) -> np.ndarray:
    """A smooth random field: Gaussian control points on a ``ctrl^d`` lattice, cubic B-spline.

    The tensor-product spline is separable, so one small matrix per axis upsamples the lattice
    (the same numbers as ``map_coordinates(order=3)``, at a fraction of its cost in 3D)."""
    field = rng.standard_normal((ctrl,) * len(shape))
    for axis, n in enumerate(shape):
        field = np.moveaxis(np.tensordot(_spline_basis(n, ctrl), field, axes=(1, axis)), 0, axis)
    return field


def _matvec(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``matrix @ points`` for a small ``(d, d)`` matrix and ``(d, N)`` points, written out: BLAS on
    this skinny shape is ten times slower and contends for cores with the caller's threads."""
    return sum(matrix[:, k, None] * points[k] for k in range(matrix.shape[1]))


# ---- one scan ------------------------------------------------------------------------------


def lesion_labels(num_scans: int, lesion_fraction: float, seed: int, shifted: bool = False) -> np.ndarray:
    """Which scans carry a lesion, balanced in blocks of 4 scans.

    Block b holds ``floor((b + 1 + u) 4f) - floor((b + u) 4f)`` lesions (u a seeded phase), in a
    seeded order within the block. Scan i's label does not depend on ``num_scans``, and every
    prefix of n scans holds ``n * f`` lesions to within 3 (a coin per scan could leave a 12-scan
    cohort with a single class)."""
    stream = SCANNERS[shifted].stream
    phase = np.random.default_rng([seed, stream, 2**31]).random()
    blocks = (num_scans + 3) // 4
    counts = np.diff(np.floor((np.arange(blocks + 1) + phase) * 4 * lesion_fraction)).astype(int)
    labels = [np.random.default_rng([seed, stream, 2**31, b]).permutation(np.arange(4) < c)
              for b, c in enumerate(counts)]
    return np.concatenate(labels)[:num_scans].astype(np.int64) if blocks else np.zeros(0, np.int64)


def simulate_scan(index: int, geo: Geometry, *, lesion: bool, seed: int, image_size: int,
                  shifted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Simulate scan ``index``. Returns ``(image, tissue)`` of shape ``geo.shape``: image float32 in
    integer scanner units, tissue uint8 labels 0..4. Depends only on its arguments, never on the
    cohort size."""
    scanner = SCANNERS[shifted]
    rng = np.random.default_rng([seed, scanner.stream, index])
    anat = _anatomy(geo.resolution)
    centre = (anat.lo_mm + anat.hi_mm) / 2.0
    grid = _grid_mm(geo, anat).reshape(3, -1)

    # 1. Motion: template_mm = centre + R (p - centre) + t + u(p), with a smooth warp u.
    if geo.dims == 2:  # in-plane rotation dominates; small tilts move the cut through the volume
        angles, shift = rng.uniform(-1, 1, 3) * [3.0, 3.0, 8.0], rng.uniform(-1, 1, 3) * [4.0, 4.0, 2.0]
    else:
        angles, shift = rng.uniform(-6.0, 6.0, 3), rng.uniform(-4.0, 4.0, 3)
    warp = np.stack([_smooth_noise(rng, geo.shape, ctrl=5) for _ in range(3)]) * 2.5  # mm
    # Composed into one affine map on flat (3, N) arrays.
    inv = np.linalg.inv(anat.affine)
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    coords = _matvec(inv[:3, :3] @ rotation, grid) + _matvec(inv[:3, :3], warp.reshape(3, -1))
    coords = (coords + (inv[:3, :3] @ (centre + shift) + inv[:3, 3])[:, None]).reshape(3, *geo.shape)
    image = ndimage.map_coordinates(_smoothed_t1(geo.resolution, geo.voxel_mm), coords, order=1, cval=0.0)
    tissue = ndimage.map_coordinates(anat.labels, coords, order=0, cval=0).astype(np.uint8)

    # 2. Lesion, placed in native space so that image and tissue get the very same blob.
    if lesion:
        image = _add_lesion(rng, image, tissue, geo, anat.wm_level, image_size)

    # 3. Acquisition: PSF blur, gamma contrast, multiplicative bias, gain, Rician noise.
    blur = rng.uniform(*scanner.blur)
    if blur > 0.05:
        image = ndimage.gaussian_filter(image, blur)
    image = np.clip(image, 0.0, None) ** rng.uniform(*scanner.gamma)
    image *= np.exp(scanner.bias * _smooth_noise(rng, geo.shape, ctrl=3))
    gain = rng.uniform(*scanner.gain)
    sigma = rng.uniform(*scanner.noise) * anat.wm_level * gain
    real = image * gain + sigma * rng.standard_normal(geo.shape)
    imag = sigma * rng.standard_normal(geo.shape)
    image = np.rint(np.hypot(real, imag))  # scanners store integers
    return image.astype(np.float32), tissue


def _add_lesion(rng: np.random.Generator, image: np.ndarray, tissue: np.ndarray, geo: Geometry,
                wm_level: float, image_size: int) -> np.ndarray:
    """Blend a smooth ellipsoidal blob into ``image`` and label it 4 in ``tissue`` (in place)."""
    # At least ~1.5 output pixels in radius, so the lesion survives resizing to image_size.
    out_pixel_mm = max(geo.shape) * geo.voxel_mm / image_size
    radius = rng.uniform(max(6.0, 1.5 * out_pixel_mm), max(14.0, 2.5 * out_pixel_mm))
    white = tissue == 3
    depth = ndimage.distance_transform_edt(white, sampling=geo.voxel_mm)
    # Deep inside white matter where the brain allows; otherwise the deepest white matter there is.
    candidates = np.argwhere(depth >= min(0.6 * radius, 0.8 * depth.max()))
    centre = candidates[rng.integers(len(candidates))]
    axes = radius * rng.uniform(0.75, 1.3, geo.dims) / geo.voxel_mm
    orient, _ = np.linalg.qr(rng.standard_normal((geo.dims, geo.dims)))
    offset = np.indices(geo.shape).reshape(geo.dims, -1) - centre[:, None]
    dist = np.sqrt((((_matvec(orient.T, offset)) / axes[:, None]) ** 2).sum(0))
    dist = dist.reshape(geo.shape) * (1.0 + 0.12 * _smooth_noise(rng, geo.shape, ctrl=4))  # an uneven rim
    brain = tissue > 0
    weight = brain / (1.0 + np.exp((dist - 1.0) / 0.12))
    bright = rng.random() < 0.5
    level = wm_level * (rng.uniform(1.25, 1.55) if bright else rng.uniform(0.3, 0.6))
    tissue[(dist < 1.0) & brain] = LESION
    tissue[tuple(centre)] = LESION  # the centre is white matter, hence brain: never an empty lesion
    return image * (1.0 - weight) + level * weight


# ---- the cohort ----------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("RAYSYNTH_CACHE") or Path.home() / ".cache" / "raysynth").expanduser()


def make_cohort(num_scans: int, image_size: int, dims: int = 2, *, lesion_fraction: float = 0.5,
                seed: int = 0, shifted: bool = False, use_cache: bool = True) -> RawSet:
    """The embedded cohort as a :class:`RawSet` of ``num_scans`` scans.

    Images are float32 scanner units of one channel and :func:`native_geometry`'s ``shape`` (2D
    ``(1, H, W)``, 3D ``(1, X, Y, Z)``); masks are uint8 tissue labels (see :data:`TISSUE_NAMES`). Cached under
    :func:`cache_dir` by a hash of every argument that changes the result.
    """
    if num_scans < 1:
        raise ValueError(f"num_scans: {num_scans} must be >= 1")
    if not 0.0 < lesion_fraction < 1.0:
        raise ValueError(f"lesion_fraction: {lesion_fraction} must lie strictly between 0 and 1")
    if dims not in (2, 3):
        raise ValueError(f"dims: {dims!r} is not valid; choose one of [2, 3]")
    # The key holds no geometry, so a cache hit needs neither nilearn nor the template.
    key = dict(version=PHANTOM_VERSION, nilearn=_nilearn_version(), num_scans=num_scans, image_size=image_size,
               dims=dims, lesion_fraction=lesion_fraction, seed=seed, shifted=shifted)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"phantom-{dims}d-{digest}.npz"
    arrays = _read_cache(path) if use_cache else None
    if arrays is None:
        geo = native_geometry(image_size, dims, shifted)
        arrays = _build(num_scans, geo, lesion_fraction, seed, shifted, image_size)
        arrays["voxel_mm"] = np.float64(geo.voxel_mm)
        if use_cache:
            _write_cache(path, arrays)
    images, masks, labels = arrays["images"], arrays["masks"], arrays["labels"]
    voxel_mm = float(arrays["voxel_mm"])
    spacing = (voxel_mm,) * dims
    affine = None
    if dims == 3:  # RAS voxel axes, centred on the origin
        affine = grid_affine(images.shape[1:], spacing)
    prefix = "x" if shifted else "s"  # external ids never collide with the cohort's
    scans = [
        RawScan(id=f"{prefix}{i:04d}", subject=f"{prefix}{i:04d}", label=int(labels[i]),
                image=images[i][None].astype(np.float32), mask=masks[i], spacing=spacing, affine=affine)
        for i in range(num_scans)
    ]
    return RawSet(scans=scans, class_names=list(CLASS_NAMES), mask_names=list(TISSUE_NAMES),
                  kind="phantom-shifted" if shifted else "phantom")


def cohort_from_config(data_cfg, shifted: bool = False, num_scans: Optional[int] = None) -> RawSet:
    """:func:`make_cohort` with ``data_cfg``'s size, dims, lesion fraction and seed."""
    return make_cohort(num_scans or data_cfg.num_scans, data_cfg.image_size, data_cfg.dims,
                       lesion_fraction=data_cfg.lesion_fraction, seed=data_cfg.cohort_seed, shifted=shifted)


def _build(num_scans: int, geo: Geometry, lesion_fraction: float, seed: int, shifted: bool,
           image_size: int) -> dict[str, np.ndarray]:
    start = time.perf_counter()
    labels = lesion_labels(num_scans, lesion_fraction, seed, shifted)
    images = np.empty((num_scans, *geo.shape), dtype=np.uint16)
    masks = np.empty((num_scans, *geo.shape), dtype=np.uint8)
    logger.info("phantom: simulating %d %dD scans on a %s grid", num_scans, geo.dims, "x".join(map(str, geo.shape)))
    for i in range(num_scans):
        image, tissue = simulate_scan(i, geo, lesion=bool(labels[i]), seed=seed, image_size=image_size,
                                      shifted=shifted)
        images[i] = np.clip(image, 0, np.iinfo(np.uint16).max)
        masks[i] = tissue
        if (i + 1) % 100 == 0:
            logger.info("phantom: %d/%d scans", i + 1, num_scans)
    logger.info("phantom: built in %.1f s", time.perf_counter() - start)
    return {"images": images, "masks": masks, "labels": labels}


def _nilearn_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:  # the template ships with nilearn: another release may bring another template
        return version("nilearn")
    except PackageNotFoundError:
        return "unknown"


def _read_cache(path: Path) -> Optional[dict[str, np.ndarray]]:
    if not path.is_file():
        return None
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in ("images", "masks", "labels", "voxel_mm")}
        logger.info("phantom: cache hit %s", path)
        return arrays
    except Exception as exc:  # a damaged cache is rebuilt, never trusted
        logger.warning("phantom: ignoring unreadable cache %s (%s)", path, exc)
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a concurrent reader sees the old or the whole new file
            np.savez(fh, **arrays)
    except OSError as exc:  # a read-only cache must not stop the run
        logger.warning("phantom: could not write cache %s (%s)", path, exc)
