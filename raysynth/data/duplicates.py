"""Exact and near-duplicate images, grouped so that a group never spans two folds.

Public MRI sets and hospital exports hold the same slice several times (re-saved, re-encoded as
JPEG, rescaled, re-cropped, padded, mirrored) and adjacent slices of one patient. A pair split
across a training and a test fold inflates every metric and blinds the privacy gate, so ``prepare``
turns each group of :func:`find_groups` into one subject. numpy/scipy only; no Ray, no torch.

API: :func:`content_hash` (exact), :func:`thumbnail` (the all-pairs descriptor),
:func:`aligned_ncc` (the pair test), :func:`find_groups` -> :class:`DuplicateGroups`.

Method (``METHOD``), for 2D ``(H, W)`` / colour ``(H, W, 3|4)`` images of any size and dtype:

1. Exact: a hash of the decoded array (dtype, shape, bytes), so a lossless re-save is exact.
2. Thumbnails: grey, cropped to the foreground box (robust to padding and to background-only
   crops), 32x32, zero-mean unit-norm; NCC of all pairs by one chunked matrix product, also
   against the left-right mirror. Pairs >= max(threshold, ``SURE_NCC`` = 0.99) are duplicates.
3. Alignment: each image's ``CANDIDATES`` = 3 best thumbnail partners (NCC >= 0.25) get the NCC
   at the best relative scale (0.8-1.25: 11 steps at a 32 px grid, then 7 steps 1% apart at a
   64 px grid, Gaussian-smoothed), shift (FFT cross term, overlap >= 80% of the smaller image,
   masked NCC from integral images, sub-pixel peak) and mirror. Pairs >= threshold are duplicates.
4. Groups: connected components of exact and near pairs (union-find; transitive).

Why the alignment: a crop that cuts into the anatomy (frame-filling sagittal slices, most 512x512
tumour slices) moves the foreground box, and the thumbnail NCC of such copies falls as low as 0.39
while distinct slices of one patient reach 0.92, so no thumbnail threshold separates them. Aligned,
copies score >= 0.980 and distinct images <= 0.955.

Measured (bench/duplicates.py; the table is in BENCHMARKS.md, "Duplicate grouping"): on 394
curated brain-tumor-mri-4class slices plus 360 known copies, pairwise precision 0.991 and recall
0.998 at the default 0.97, with 2 groups found among the curated slices (real cross-split
duplicates their curators missed) and no link across the 7 patients of brain-mri-seg2d. The default
sits in the gap between the closest non-duplicate pair (0.955) and the farthest copy (0.980).

3D volumes ``(D, H, W)``: exact hashes and 24^3 thumbnails (mirrors along each axis) only. On
brain-mri-3d (22 volumes, 13 subjects) the alignment at a 24^3 grid scored different healthy IXI
subjects 0.976-0.985 and merged all 10 of them; 24^3 thumbnails score different subjects <= 0.921,
group none at 0.97, and find rescaled (1.3x 6/6, 0.5x without anti-aliasing 4/6), mirrored, padded
(6/6), noisy (5/6) and 6-10% cropped copies (5/6).

The embedded phantom is one subject: its scans are repeat acquisitions of one slice level, and at
0.97 the 557-scan default cohort forms 27 groups of 102 scans (largest 24; none at 0.98). Group
real data; do not near-group the phantom (its exact hashes are all distinct).

Cost (idle machine): 4.5 ms to decode a 512x512 JPEG, 5 ms per image for thumbnail and alignment
crop, 9.5 ms per aligned pair (~1.6 pairs per image): 28 ms per image on one core for the 754-image
set. All-pairs thumbnails for N = 5000: 0.8 s, 116 MB peak; the alignment crops take 16 KB per image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
from scipy import fft, ndimage, sparse
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

DEFAULT_THRESHOLD = 0.97
"""Aligned NCC at or above which two images are near-duplicates (see the module docstring)."""
SURE_NCC = 0.99
"""Thumbnail NCC at or above which a pair is a duplicate without the alignment search (distinct
images measured <= 0.924; the alignment seldom scores a pair lower than its thumbnails)."""
CANDIDATE_FLOOR = 0.25
"""Thumbnail NCC below which a pair is never aligned (the worst measured copy scored 0.39)."""
CANDIDATES = 3
"""How many best thumbnail partners of each image are aligned (1 finds 0.986 of the copies, 3 finds 0.997)."""
THUMBNAIL_SIZE = {2: 32, 3: 24}
ALIGN_SIZE = {2: (32, 64), 3: (12, 24)}
"""Long side of the coarse and of the fine alignment grid."""
ALIGN_BLUR = (0.7, 1.0)
"""Gaussian sigma, in grid pixels, applied at the coarse and at the fine alignment level."""
ALIGN_SCALES = tuple(np.exp(np.linspace(np.log(0.8), np.log(1.25), 11)))
"""Relative scales searched at the coarse level (4.5% apart), refined in 1% steps around the best."""
FINE_STEPS = 7
FINE_STEP = 0.01
MIN_OVERLAP = 0.8
"""An alignment counts only where the images overlap on >= this fraction of the smaller one."""
FOREGROUND_LEVEL = 0.1
"""Foreground: pixels above min + this fraction of (99.9th percentile - min)."""
FOREGROUND_TRIM = 0.005
"""Fraction of foreground pixels allowed outside the bounding box at each end (specks, labels)."""
METHOD = "ncc-crop-flip+aligned"
_BASE_SIDE = {2: 96, 3: 36}
_CHUNK_ELEMENTS = 2**22  # block of the thumbnail similarity matrix computed at once (16 MiB of float32)


# ---- per-image features --------------------------------------------------------------------------


def _check_image(image, where: str) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool) \
            or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"{where}: dtype {a.dtype} is not a real numeric image")
    colour = a.ndim == 3 and a.shape[-1] in (3, 4)
    if a.ndim not in (2, 3):
        raise ValueError(f"{where}: shape {a.shape} is not a 2D (H, W), colour (H, W, 3|4) or 3D (D, H, W) array")
    if a.size == 0 or min(a.shape[:2] if colour else a.shape) < 1:
        raise ValueError(f"{where}: shape {a.shape} is empty")
    return a


def _spatial(image: np.ndarray) -> np.ndarray:
    """``image`` as a float32 greyscale array of its spatial dims (colour channels summed)."""
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] in (3, 4):  # (H, W, RGB[A]): the alpha channel is dropped
        a = a[..., 0].astype(np.float32) + a[..., 1] + a[..., 2]
    else:
        a = a.astype(np.float32)
    if not np.isfinite(a).all():  # NaN / inf (NIfTI background): the darkest finite value
        finite = np.isfinite(a)
        a = np.where(finite, a, a[finite].min() if finite.any() else 0.0).astype(np.float32)
    return a


def content_hash(image: np.ndarray) -> str:
    """Hex digest of the decoded array: dtype, shape and bytes (byte order normalised).

    Two files hold the same image exactly when their decoded arrays have the same hash, whatever
    the file format or name (a PNG re-saved as TIFF, a lossless copy)."""
    a = np.asarray(image)
    if a.dtype.byteorder not in ("=", "|"):
        a = a.astype(a.dtype.newbyteorder("="))
    a = np.ascontiguousarray(a)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def foreground_box(a: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the foreground of a greyscale array, robust to specks and burnt-in labels."""
    # On a 3-pixel box average: background noise shrinks below the level, and so do specks.
    smooth = ndimage.uniform_filter(a, 3, mode="nearest")
    flat = smooth.ravel()
    sample = flat[:: max(1, flat.size // 2**20)]
    lo, hi = float(sample.min()), float(np.quantile(sample, 0.999))
    if hi <= lo:
        hi = float(flat.max())
    if hi <= lo:
        return tuple(slice(0, n) for n in a.shape)
    mask = smooth > lo + FOREGROUND_LEVEL * (hi - lo)
    total = int(mask.sum())
    if total == 0:
        return tuple(slice(0, n) for n in a.shape)
    box = []
    for axis in range(a.ndim):
        cum = np.cumsum(mask.sum(axis=tuple(k for k in range(a.ndim) if k != axis)))
        start = int(np.searchsorted(cum, FOREGROUND_TRIM * total, side="right"))
        stop = int(np.searchsorted(cum, (1.0 - FOREGROUND_TRIM) * total, side="left")) + 1
        box.append(slice(start, max(stop, start + 1)))
    return tuple(box)


def _resize_axis(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Area-average ``a`` along ``axis`` into ``n_out`` equal bins (an exact box integral; no BLAS)."""
    a = np.moveaxis(a, axis, 0)
    n = a.shape[0]
    cum = np.zeros((n + 1, *a.shape[1:]), dtype=np.float64)
    np.cumsum(a, axis=0, out=cum[1:])
    edges = np.linspace(0.0, n, n_out + 1)
    whole = np.minimum(edges.astype(np.int64), n - 1)
    frac = (edges - whole).reshape(-1, *([1] * (a.ndim - 1)))
    integral = cum[whole] + frac * a[whole]  # integral of the piecewise-constant signal up to each edge
    return np.moveaxis(np.diff(integral, axis=0) * (n_out / n), 0, axis)


def resize_area(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Area-average (box-filter) resize of an nD array to ``shape``, one axis at a time, largest cut first."""
    for axis in sorted(range(a.ndim), key=lambda k: shape[k] / a.shape[k]):
        if a.shape[axis] != shape[axis]:
            a = _resize_axis(a, axis, int(shape[axis]))
    return np.asarray(a, dtype=np.float64)


def _unit(t: np.ndarray) -> np.ndarray:
    t = t - t.mean()
    norm = np.linalg.norm(t)
    return (t / norm if norm > 0 else t).astype(np.float32)


def thumbnail(image: np.ndarray, size: Optional[int] = None, *, crop: bool = True) -> np.ndarray:
    """The image as a small zero-mean, unit-norm float32 array for NCC by a dot product.

    Greyscale (colour channels summed), cropped to :func:`foreground_box` (so padding and
    background-only crops do not matter; ``crop=False`` keeps the whole frame), area-resized to
    ``size`` pixels per axis (default 32 for 2D, 16 for 3D; the aspect ratio is not kept)."""
    a = _spatial(_check_image(image, "image"))
    if size is not None and (isinstance(size, bool) or int(size) != size or size < 2):
        raise ValueError(f"size: {size!r} must be an integer >= 2")
    size = int(size or THUMBNAIL_SIZE[a.ndim])
    if crop:
        a = a[foreground_box(a)]
    return _unit(resize_area(a, (size,) * a.ndim))


def _base(a: np.ndarray, cropped: bool = False) -> np.ndarray:
    """The foreground crop kept for alignment: long side at most ``_BASE_SIDE``, z-scored, float16."""
    if not cropped:
        a = a[foreground_box(a)]
    k = min(1.0, _BASE_SIDE[a.ndim] / max(a.shape))
    if k < 1.0:
        a = resize_area(a, tuple(max(2, round(n * k)) for n in a.shape))
    a = a - a.mean()
    std = a.std()
    return (a / std if std > 0 else a).astype(np.float16)


# ---- alignment: NCC at the best scale, shift and mirror ------------------------------------------


def _grid(base: np.ndarray, side: int, scale: float, blur: float) -> np.ndarray:
    k = side / max(base.shape) * scale
    t = resize_area(base.astype(np.float32), tuple(max(2, round(n * k)) for n in base.shape))
    if blur > 0:
        t = ndimage.gaussian_filter(t, blur, mode="nearest")
    std = t.std()
    return (t - t.mean()) / std if std > 0 else t - t.mean()


def _integral(a: np.ndarray) -> np.ndarray:
    out = np.zeros(tuple(n + 1 for n in a.shape))
    out[tuple(slice(1, None) for _ in a.shape)] = a
    for axis in range(a.ndim):
        np.cumsum(out, axis=axis, out=out)
    return out


def _box_sum(cum: np.ndarray, lo: list[np.ndarray], hi: list[np.ndarray]) -> np.ndarray:
    """Sums over the boxes ``[lo, hi)`` (one bound array per axis, as an outer product), from the
    integral image ``cum``: one difference of two gathers per axis."""
    for axis in range(cum.ndim):
        cum = cum.take(hi[axis], axis=axis) - cum.take(lo[axis], axis=axis)
    return cum


def _best_ncc(fixed: np.ndarray, moving: list[np.ndarray], refine: bool) -> np.ndarray:
    """For each moving array: the highest NCC over all shifts where the overlap covers at least
    ``MIN_OVERLAP`` of the smaller array (the overlap's own mean and variance: a masked NCC).

    The cross term comes from one FFT product; the sums over each overlap box from integral images."""
    d = fixed.ndim
    big = [max(m.shape[k] for m in moving) for k in range(d)]
    shape = [fft.next_fast_len(fixed.shape[k] + big[k] - 1, real=True) for k in range(d)]
    axes = tuple(range(-d, 0))
    ff = fft.rfftn(fixed, shape, axes=axes)
    stack = np.zeros((len(moving), *shape))
    for i, m in enumerate(moving):
        stack[(i, *[slice(0, n) for n in m.shape])] = m
    cross = fft.irfftn(ff[None] * np.conj(fft.rfftn(stack, shape, axes=axes)), shape, axes=axes)
    cum_f, cum_f2 = _integral(fixed), _integral(fixed * fixed)
    out = np.full(len(moving), -1.0)
    for i, m in enumerate(moving):
        f_lo, f_hi, m_lo, m_hi, length, wrap = [], [], [], [], [], []
        need = MIN_OVERLAP * min(fixed.size, m.size)
        widest = [min(fixed.shape[k], m.shape[k]) for k in range(d)]
        for k in range(d):
            nf, nm = fixed.shape[k], m.shape[k]
            # Shifts whose overlap along this axis can still reach ``need`` (with full overlap elsewhere).
            shortest = int(np.ceil(need / np.prod([w for j, w in enumerate(widest) if j != k]) - 1e-9))
            u = np.arange(-(nm - 1), nf)  # m's pixel x lies on fixed's pixel x + u
            u = u[np.minimum(nf, u + nm) - np.maximum(u, 0) >= shortest]
            f_lo.append(np.maximum(u, 0)); f_hi.append(np.minimum(nf, u + nm))
            m_lo.append(np.maximum(-u, 0)); m_hi.append(np.minimum(nm, nf - u))
            length.append(f_hi[-1] - f_lo[-1]); wrap.append(u % shape[k])
        n = np.ones(())
        for k in range(d):
            n = np.multiply.outer(n, length[k]) if k else length[0].astype(float)
        ok = n >= MIN_OVERLAP * min(fixed.size, m.size)
        if not ok.any():
            continue
        cum_m, cum_m2 = _integral(m), _integral(m * m)
        sf, sff = _box_sum(cum_f, f_lo, f_hi), _box_sum(cum_f2, f_lo, f_hi)
        sm, smm = _box_sum(cum_m, m_lo, m_hi), _box_sum(cum_m2, m_lo, m_hi)
        sfm = cross[(i, *np.ix_(*wrap))]
        n = np.where(ok, n, 1.0)
        var = np.clip(sff - sf * sf / n, 0, None) * np.clip(smm - sm * sm / n, 0, None)
        ncc = np.where(ok & (var > 1e-12), (sfm - sf * sm / n) / np.sqrt(np.maximum(var, 1e-300)), -1.0)
        peak = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
        best = float(ncc[peak])
        if refine:  # sub-pixel: a parabola through the peak and its neighbours, per axis
            gain = 0.0
            for k in range(d):
                if 0 < peak[k] < ncc.shape[k] - 1:
                    lo = ncc[tuple(p - (j == k) for j, p in enumerate(peak))]
                    hi = ncc[tuple(p + (j == k) for j, p in enumerate(peak))]
                    curv = lo - 2 * best + hi
                    if lo > -1 and hi > -1 and curv < 0:
                        gain += -((hi - lo) ** 2) / (8 * curv)
            best = min(1.0, best + gain)
        out[i] = best
    return out


def _orientations(d: int, flips: bool) -> list[tuple[int, ...]]:
    """Axes to mirror: none, and for 2D the columns; for 3D each axis in turn."""
    if not flips:
        return [()]
    return [(), (1,)] if d == 2 else [(), (0,), (1,), (2,)]


def _aligned_ncc(base_a: np.ndarray, base_b: np.ndarray, flips: bool) -> float:
    d = base_a.ndim
    coarse, fine = ALIGN_SIZE[d]
    blur_c, blur_f = ALIGN_BLUR
    fixed = _grid(base_a, coarse, 1.0, blur_c)
    cands = [(s, o) for o in _orientations(d, flips) for s in ALIGN_SCALES]
    grids = {s: _grid(base_b, coarse, s, blur_c) for s in ALIGN_SCALES}
    scores = _best_ncc(fixed, [np.flip(grids[s], o) if o else grids[s] for s, o in cands], refine=False)
    s0, o0 = cands[int(np.argmax(scores))]
    fixed = _grid(base_a, fine, 1.0, blur_f)
    scales = s0 * np.exp(FINE_STEP * (np.arange(FINE_STEPS) - FINE_STEPS // 2))
    moving = [_grid(base_b, fine, s, blur_f) for s in scales]
    scores = _best_ncc(fixed, [np.flip(m, o0) if o0 else m for m in moving], refine=True)
    return float(scores.max())


def aligned_ncc(a: np.ndarray, b: np.ndarray, *, flips: bool = True) -> float:
    """NCC of two images (2D or 3D, the same number of spatial dims) at the best relative scale
    (0.78-1.28), shift (overlap >= 80% of the smaller foreground crop) and, with ``flips``,
    mirror: what :func:`find_groups` compares with its threshold."""
    fa, fb = _spatial(_check_image(a, "a")), _spatial(_check_image(b, "b"))
    if fa.ndim != fb.ndim:
        raise ValueError(f"b: {fb.ndim}D, but a is {fa.ndim}D; only images of the same kind compare")
    return _aligned_ncc(_base(fa), _base(fb), flips)


# ---- all pairs -----------------------------------------------------------------------------------


def _variants(thumbs: np.ndarray, flips: bool) -> list[np.ndarray]:
    n, *shape = thumbs.shape
    return [np.ascontiguousarray(np.flip(thumbs, axis=tuple(a + 1 for a in o)) if o else thumbs).reshape(n, -1)
            for o in _orientations(len(shape), flips)]


def thumbnail_pairs(thumbs: np.ndarray, sure: float, floor: float, k: int, flips: bool = True):
    """Thumbnail NCC over all pairs, ``_CHUNK_ELEMENTS`` of the matrix at a time.

    Returns ``(sure_pairs, candidates)``, each ``(i, j, score)`` with ``i < j``: the pairs at or
    above ``sure``, and each image's ``k`` best partners scoring in ``[floor, sure)``."""
    n = len(thumbs)
    variants = _variants(thumbs, flips)
    base = variants[0]
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    sure_p, cand_p = [], []
    for a in range(0, n, rows):
        b = min(n, a + rows)
        block = base[a:b] @ variants[0].T
        for v in variants[1:]:
            np.maximum(block, base[a:b] @ v.T, out=block)
        r = np.arange(b - a)
        block[r, r + a] = -np.inf  # self
        i, j = np.nonzero(block >= sure)
        keep = j > i + a
        sure_p.append((i[keep] + a, j[keep], block[i[keep], j[keep]]))
        if k > 0 and n > 1:
            kk = min(k, n - 1)
            top = np.argpartition(-block, kk - 1, axis=1)[:, :kk]
            s = np.take_along_axis(block, top, axis=1)
            ok = (s >= floor) & (s < sure)
            ii = np.broadcast_to(r[:, None] + a, top.shape)[ok]
            jj, ss = top[ok], s[ok]
            cand_p.append((np.minimum(ii, jj), np.maximum(ii, jj), ss))

    def cat(parts):
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return tuple(np.concatenate([p[m] for p in parts]) for m in range(3))

    ci, cj, cs = cat(cand_p)
    if len(ci):  # each unordered pair once
        _, first = np.unique(ci * n + cj, return_index=True)
        ci, cj, cs = ci[first], cj[first], cs[first]
    return cat(sure_p), (ci, cj, cs)


@dataclass
class DuplicateGroups:
    """The result of :func:`find_groups`.

    ``group[i]`` is image i's group index (0.. by first appearance; an image with no duplicate has
    a group of its own). ``groups`` lists the groups of two or more images. ``pairs``/``scores``/
    ``kinds`` are a spanning forest of the accepted pairs, strongest first: the evidence that put
    each grouped image in its group (``kinds``: "exact", "thumbnail" or "aligned")."""

    group: np.ndarray
    groups: list[list[int]]
    threshold: float
    method: str
    num_exact: int
    """Images whose decoded array is identical to an earlier image's."""
    pairs: np.ndarray
    scores: np.ndarray
    kinds: np.ndarray
    num_aligned: int = 0
    """Candidate pairs the alignment search examined."""

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_grouped_images(self) -> int:
        return sum(len(g) for g in self.groups)


_KINDS = np.array(["exact", "thumbnail", "aligned"])


def _evidence(n: int, ei, ej, es, ek):
    """The strongest spanning forest of the accepted pairs, strongest first: ``(pairs, scores, kinds)``."""
    if not len(ei):
        return np.zeros((0, 2), np.int64), np.zeros(0), _KINDS[:0]
    lo, hi = np.minimum(ei, ej).astype(np.int64), np.maximum(ei, ej).astype(np.int64)
    key = lo * n + hi
    order = np.lexsort((-es, key))  # per pair, its highest score first
    first = order[np.r_[True, key[order][1:] != key[order][:-1]]]
    # Weights 2 - score lie in [1, 3): never 0, which scipy would read as no edge.
    w = sparse.coo_matrix((2.0 - es[first], (lo[first], hi[first])), shape=(n, n)).tocsr()
    tree = minimum_spanning_tree(w).tocoo()
    t_lo, t_hi = np.minimum(tree.row, tree.col), np.maximum(tree.row, tree.col)
    at = first[np.searchsorted(key[first], t_lo.astype(np.int64) * n + t_hi)]
    by = np.lexsort((t_hi, t_lo, -es[at]))
    at = at[by]
    return np.stack([lo[at], hi[at]], axis=1), es[at].astype(np.float64), _KINDS[ek[at]]


def find_groups(images: Iterable[np.ndarray], *, threshold: float = DEFAULT_THRESHOLD, flips: bool = True,
                align: bool = True, candidates: int = CANDIDATES) -> DuplicateGroups:
    """Group exact and near-duplicate images.

    Args:
        images: 2D ``(H, W)``, colour ``(H, W, 3|4)`` or 3D ``(D, H, W)`` arrays of any size and
            real dtype; read once each, so a lazy iterable works. 2D and 3D images never group.
        threshold: near-duplicates have an NCC of at least this (in (0, 1]); with ``align`` the
            NCC after the alignment search (:func:`aligned_ncc`), else the thumbnail NCC.
        flips: also compare against mirrored images (2D: left-right; 3D: each axis).
        align: search scale and shift for each image's ``candidates`` best thumbnail matches
            (finds re-cropped copies); False: thumbnail NCC only (faster, misses most crops
            into the anatomy).
        candidates: how many best thumbnail matches per image the alignment examines.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)) \
            or not (0.0 < float(threshold) <= 1.0):
        raise ValueError(f"threshold: {threshold!r} must lie in (0, 1]")
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 0:
        raise ValueError(f"candidates: {candidates!r} must be an integer >= 0")
    for name, value in (("flips", flips), ("align", align)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name}: {value!r} must be True or False")
    threshold = float(threshold)
    first: dict[str, int] = {}
    rep: list[int] = []
    thumbs: dict[int, np.ndarray] = {}
    bases: dict[int, np.ndarray] = {}
    for i, image in enumerate(images):
        a = _check_image(image, f"images[{i}]")
        r = first.setdefault(content_hash(a), i)
        rep.append(r)
        if r == i:
            grey = _spatial(a)
            grey = grey[foreground_box(grey)]
            thumbs[i] = _unit(resize_area(grey, (THUMBNAIL_SIZE[grey.ndim],) * grey.ndim))
            if align and grey.ndim == 2:  # 3D: thumbnails only (see the module docstring)
                bases[i] = _base(grey, cropped=True)
    n = len(rep)
    if n == 0:
        raise ValueError("images: is empty; give at least one image")
    rep_arr = np.asarray(rep)
    dup = np.nonzero(rep_arr != np.arange(n))[0]
    edges = [(rep_arr[dup], dup, np.ones(len(dup)), np.full(len(dup), 0, np.int8))]  # kinds: _KINDS
    num_aligned = 0
    for d in (2, 3):
        members = np.array([i for i, t in thumbs.items() if t.ndim == d], dtype=np.int64)
        if len(members) < 2:
            continue
        stack = np.stack([thumbs[i] for i in members])
        aligning = align and d == 2
        sure = max(threshold, SURE_NCC) if aligning else threshold
        (si, sj, ss), (ci, cj, _) = thumbnail_pairs(stack, sure, CANDIDATE_FLOOR, candidates if aligning else 0, flips)
        edges.append((members[si], members[sj], ss, np.full(len(si), 1, np.int8)))
        if aligning and len(ci):
            scores = np.array([_aligned_ncc(bases[members[x]], bases[members[y]], flips) for x, y in zip(ci, cj)])
            num_aligned += len(ci)
            ok = scores >= threshold
            edges.append((members[ci[ok]], members[cj[ok]], scores[ok], np.full(int(ok.sum()), 2, np.int8)))
    ei, ej, es, ek = (np.concatenate([e[m] for e in edges]) for m in range(4))
    graph = sparse.coo_matrix((np.ones(len(ei)), (ei, ej)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first_pos, inverse = np.unique(labels, return_index=True, return_inverse=True)
    group = np.argsort(np.argsort(first_pos))[inverse.ravel()]  # numbered by first appearance
    order = np.argsort(group, kind="stable")
    bounds = np.flatnonzero(np.diff(group[order])) + 1
    groups = sorted((g.tolist() for g in np.split(order, bounds) if len(g) > 1), key=lambda g: g[0])
    pairs, scores, kinds = _evidence(n, ei, ej, es, ek)
    return DuplicateGroups(group=group.astype(np.int64), groups=groups, threshold=threshold,
                           method=METHOD if align else "ncc-crop-flip", num_exact=int(len(dup)),
                           pairs=pairs, scores=scores, kinds=kinds, num_aligned=num_aligned)
