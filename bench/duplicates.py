"""Exact and near-duplicate grouping on real MRI (a benchmark, not a test).

    .venv/bin/python bench/duplicates.py [--seed 0] [--per-kind 30] [--json /tmp/duplicates.json] [--quick]

Measures which method finds known copies without grouping distinct images, for several thresholds:

- ``aligned`` (raysynth.data.duplicates' default): thumbnail pairs >= 0.99 directly, and for each
  image's 3 best thumbnail matches the NCC after a scale/shift/mirror search (``aligned-k1``: its
  single best match only);
- ``ncc-crop-flip`` (``find_groups(align=False)``): NCC of 32x32 foreground-cropped thumbnails, also
  against the left-right mirror; ablations ``ncc-crop`` (no mirror), ``ncc-flip`` (no crop) and
  ``ncc16-crop-flip`` (16x16 thumbnails);
- ``phash``: a DCT perceptual hash written here the way the ``imagehash`` package computes it (the
  whole image as 8-bit grey, LANCZOS to 32x32, 2D DCT-II, the 8x8 lowest frequencies against their
  median: 64 bits), Hamming distance <= threshold; ``phash-crop-flip``: the same hash of the
  foreground crop, the smaller distance of the image and of its mirror.

Data (read in place from ``../shared/data`` beside the repository, never copied; each part is skipped
with a message when its folder is absent):

1. ``brain-tumor-mri-4class``: 394 JPEGs, one per curator duplicate group (``manifest.csv``'s
   ``dup_group`` is unique per file: the curators merged exact copies, rescaled or re-cropped copies
   and adjacent slices and kept one image of each group). Every pair a method groups here is a
   group it invents beyond the curators'.
2. ``assembled``: those 394 images plus known copies of random sources: ``--per-kind`` copies for
   every kind in ``CORE_KINDS`` (re-encoded, rescaled, re-cropped, padded, mirrored and
   combinations). Pairwise precision/recall over image pairs, and the fraction of copies that land
   in their source's group (per kind too). ``EXTRA_KINDS`` (contrast change, heavier crops, a small
   rotation) are scored apart: informative, not asked of the method.
3. ``brain-mri-seg2d``: 242 axial slices of 7 patients; cross-patient pairs grouped (should be ~0)
   and adjacent-slice pairs of one patient grouped (informative only).
4. ``brain-mri-3d`` (the default only): 22 volumes of 13 subjects; different-subject pairs grouped
   (should be 0) and recall of rescaled, mirrored, padded, noisy and re-cropped copies.

Prints the machine (CPU model, avx2/avx512f, cores, load), the date, times per image, a compact
table, and the figures behind the default in raysynth/data/duplicates.py. ``--json`` writes all
rows to a file (outside the repository, e.g. /tmp).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import fft, sparse
from scipy.sparse.csgraph import connected_components

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raysynth.data import duplicates as dup  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NCC_THRESHOLDS = [0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]
HAMMING_THRESHOLDS = [0, 2, 4, 6, 8, 10, 12, 14, 16, 20]

CORE_KINDS = [
    "exact", "grey", "jpeg70", "scale0.5", "scale1.7", "crop", "pad", "mirror",
    "mirror+jpeg70", "crop+scale0.5+jpeg70", "pad+scale1.7+mirror", "crop+mirror+scale0.5+jpeg70",
]
EXTRA_KINDS = ["gamma0.7", "crop15", "rotate3", "jpeg30+scale0.3"]


# ---- copies --------------------------------------------------------------------------------------


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert(im.mode)


def _crop(im: Image.Image, rng, lo: float, hi: float) -> Image.Image:
    """Drop a total margin of lo..hi of each side's length, split at random between the two ends."""
    w, h = im.size
    fw, fh = rng.uniform(lo, hi, 2)
    sw, sh = rng.uniform(0, 1, 2)
    left, top = int(round(w * fw * sw)), int(round(h * fh * sh))
    right, bottom = w - int(round(w * fw * (1 - sw))), h - int(round(h * fh * (1 - sh)))
    return im.crop((left, top, right, bottom))


def _pad(im: Image.Image, rng) -> Image.Image:
    """Pad with the background (the darkest value) by 5-15% of each side, at random ends."""
    w, h = im.size
    fw, fh = rng.uniform(0.05, 0.15, 2)
    sw, sh = rng.uniform(0, 1, 2)
    nw, nh = int(round(w * (1 + fw))), int(round(h * (1 + fh)))
    background = tuple(int(v) for v in np.asarray(im).reshape(-1, len(im.getbands())).min(0))
    out = Image.new(im.mode, (nw, nh), background if len(background) > 1 else background[0])
    out.paste(im, (int(round((nw - w) * sw)), int(round((nh - h) * sh))))
    return out


def make_copy(image: np.ndarray, kind: str, rng) -> np.ndarray:
    im = Image.fromarray(image)
    for step in kind.split("+"):
        if step == "exact":
            return image.copy()
        if step == "grey":
            im = im.convert("L")
        elif step.startswith("jpeg"):
            im = _jpeg(im, int(step[4:]))
        elif step.startswith("scale"):
            f = float(step[5:])
            im = im.resize((max(8, round(im.width * f)), max(8, round(im.height * f))), Image.BICUBIC)
        elif step == "crop":
            im = _crop(im, rng, 0.06, 0.10)
        elif step == "crop15":
            im = _crop(im, rng, 0.15, 0.20)
        elif step == "pad":
            im = _pad(im, rng)
        elif step == "mirror":
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        elif step.startswith("gamma"):
            a = np.asarray(im).astype(np.float64) / 255.0
            im = Image.fromarray(np.clip(np.rint(255 * a ** float(step[5:])), 0, 255).astype(np.uint8))
        elif step.startswith("rotate"):
            im = im.rotate(float(step[6:]), resample=Image.BILINEAR)
        else:
            raise ValueError(f"unknown copy step {step!r}")
    return np.asarray(im)


# ---- methods: a similarity matrix per method (dense; these sets are small) ------------------------


def _ncc_matrix(images, size: int, crop: bool, flips: bool):
    t0 = time.perf_counter()
    thumbs = np.stack([dup.thumbnail(im, size, crop=crop) for im in images])
    t1 = time.perf_counter()
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float64)
    sim = flat @ flat.T
    if flips:
        sim = np.maximum(sim, flat @ thumbs[..., ::-1].reshape(len(thumbs), -1).T)
    np.fill_diagonal(sim, -np.inf)
    return sim, (t1 - t0) / len(images), time.perf_counter() - t1


def phash_bits(image: np.ndarray, crop: bool = False) -> np.ndarray:
    """``(2, 64)`` bool: the pHash of the image and of its left-right mirror (imagehash's recipe)."""
    if crop:
        a = dup._spatial(image)
        a = a[dup.foreground_box(a)]
        lo, hi = a.min(), a.max()
        grey = Image.fromarray(np.uint8(np.rint(255 * (a - lo) / (hi - lo if hi > lo else 1))))
    else:
        grey = Image.fromarray(image).convert("L")
    px = np.asarray(grey.resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = fft.dctn(px, type=2)[:8, :8]
    mirrored = low * (-1.0) ** np.arange(8)[None, :]  # a column flip negates the odd column frequencies
    return np.stack([low > np.median(low), mirrored > np.median(mirrored)])


def _phash_matrix(images, crop: bool, flips: bool):
    t0 = time.perf_counter()
    bits = np.stack([phash_bits(im, crop) for im in images]).reshape(len(images), 2, 64).astype(np.float64)
    t1 = time.perf_counter()
    a, m = bits[:, 0], bits[:, 1]
    dist = a @ (1 - a).T + (1 - a) @ a.T
    if flips:
        dist = np.minimum(dist, a @ (1 - m).T + (1 - a) @ m.T)
    np.fill_diagonal(dist, np.inf)
    return -dist, (t1 - t0) / len(images), time.perf_counter() - t1  # similarity = -distance


def _aligned_matrix(images, candidates: int, flips: bool = True):
    """raysynth's default: thumbnail pairs >= SURE_NCC keep their thumbnail NCC, each image's
    ``candidates`` best thumbnail matches get the aligned NCC; every other pair -inf (never grouped)."""
    n = len(images)
    t0 = time.perf_counter()
    grey = [dup._spatial(im) for im in images]
    thumbs = np.stack([dup._unit(dup.resize_area(g[dup.foreground_box(g)], (32, 32))) for g in grey])
    bases = [dup._base(g) for g in grey]
    t1 = time.perf_counter()
    (si, sj, ss), (ci, cj, _) = dup.thumbnail_pairs(thumbs, dup.SURE_NCC, dup.CANDIDATE_FLOOR, candidates, flips)
    sim = np.full((n, n), -np.inf)
    sim[si, sj] = sim[sj, si] = ss
    for x, y in zip(ci, cj):
        sim[x, y] = sim[y, x] = dup._aligned_ncc(bases[x], bases[y], flips)
    t2 = time.perf_counter()
    print(f"    aligned: {len(ci)} candidate pairs for N={n}, {1e3 * (t2 - t1) / max(len(ci), 1):.1f} ms/pair")
    return sim, (t1 - t0) / n, t2 - t1


ALIGNED_THRESHOLDS = [0.93, 0.94, 0.95, 0.955, 0.96, 0.965, 0.97, 0.975, 0.98, 0.985, 0.99]
METHODS = {
    "aligned": (lambda ims: _aligned_matrix(ims, dup.CANDIDATES), ALIGNED_THRESHOLDS),
    "aligned-k1": (lambda ims: _aligned_matrix(ims, 1), ALIGNED_THRESHOLDS),
    "ncc-crop-flip": (lambda ims: _ncc_matrix(ims, 32, True, True), NCC_THRESHOLDS),
    "ncc-crop": (lambda ims: _ncc_matrix(ims, 32, True, False), NCC_THRESHOLDS),
    "ncc-flip": (lambda ims: _ncc_matrix(ims, 32, False, True), NCC_THRESHOLDS),
    "ncc16-crop-flip": (lambda ims: _ncc_matrix(ims, 16, True, True), NCC_THRESHOLDS),
    "phash": (lambda ims: _phash_matrix(ims, False, False), HAMMING_THRESHOLDS),
    "phash-crop-flip": (lambda ims: _phash_matrix(ims, True, True), HAMMING_THRESHOLDS),
}


def _similarity(method: str, threshold: float) -> float:
    return -threshold if method.startswith("phash") else threshold


def components(sim: np.ndarray, cut: float) -> np.ndarray:
    i, j = np.nonzero(np.triu(sim >= cut - 1e-9, 1))
    graph = sparse.coo_matrix((np.ones(len(i)), (i, j)), shape=sim.shape)
    return connected_components(graph, directed=False)[1]


def _pairs(labels: np.ndarray) -> int:
    counts = np.bincount(labels)
    return int((counts * (counts - 1) // 2).sum())


def pair_scores(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Pairwise precision/recall of a grouping against true groups (over all image pairs)."""
    _, joint = np.unique(np.stack([pred, truth]), axis=1, return_inverse=True)
    tp, pp, tt = _pairs(joint.ravel()), _pairs(pred), _pairs(truth)
    return {"pred_pairs": pp, "true_pairs": tt, "tp": tp,
            "precision": tp / pp if pp else 1.0, "recall": tp / tt if tt else 1.0}


# ---- the data sets -------------------------------------------------------------------------------


def load_4class():
    root = DATA / "brain-tumor-mri-4class"
    if not (root / "manifest.csv").is_file():
        print(f"SKIP brain-tumor-mri-4class: {root} is absent")
        return None
    rows = list(csv.DictReader(open(root / "manifest.csv", newline="")))
    groups = [r["dup_group"] for r in rows]
    assert len(set(groups)) == len(rows), "expected one file per curator group"
    t0 = time.perf_counter()
    images = [np.asarray(Image.open(root / r["staged_path"])) for r in rows]
    decode = (time.perf_counter() - t0) / len(images)
    return [r["staged_path"] for r in rows], images, decode


def load_seg2d():
    root = DATA / "brain-mri-seg2d"
    if not (root / "manifest.csv").is_file():
        print(f"SKIP brain-mri-seg2d: {root} is absent")
        return None
    rows = list(csv.DictReader(open(root / "manifest.csv", newline="")))
    images = [np.asarray(Image.open(root / r["image"])) for r in rows]
    return rows, images


def assemble(images, kinds, per_kind: int, seed: int):
    """Sources plus ``per_kind`` copies of random sources for each kind; truth = source index."""
    rng = np.random.default_rng(seed)
    out, truth, kind_of = list(images), list(range(len(images))), [None] * len(images)
    for kind in kinds:
        for s in rng.choice(len(images), per_kind, replace=False):
            out.append(make_copy(images[s], kind, rng))
            truth.append(int(s))
            kind_of.append(kind)
    return out, np.asarray(truth), kind_of


def load_3d():
    root = DATA / "brain-mri-3d"
    if not (root / "labels.csv").is_file():
        print(f"SKIP brain-mri-3d: {root} is absent")
        return None
    try:
        import nibabel as nib
    except ImportError:
        print("SKIP brain-mri-3d: nibabel is not installed")
        return None
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    vols = [np.asarray(nib.as_closest_canonical(nib.load(root / r["file"])).dataobj, dtype=np.float32) for r in rows]
    return rows, vols


VOLUME_KINDS = ["zoom0.5", "zoom1.3", "mirror-x", "pad", "noise2%", "crop"]


def volume_copy(v: np.ndarray, kind: str, rng) -> np.ndarray:
    from scipy import ndimage

    if kind.startswith("zoom"):
        return ndimage.zoom(v, float(kind[4:]), order=1)
    if kind == "mirror-x":
        return v[::-1].copy()
    if kind == "pad":
        return np.pad(v, 8)
    if kind == "noise2%":
        return v + rng.normal(0, 0.02 * float(v.max()), v.shape).astype(np.float32)
    if kind == "crop":  # drop 6-10% of every axis, split at random between the two ends
        box = []
        for n in v.shape:
            f, u = rng.uniform(0.06, 0.10), rng.uniform()
            lo = int(round(n * f * u))
            box.append(slice(lo, n - int(round(n * f)) + lo))
        return v[tuple(box)]
    raise ValueError(kind)


def bench_3d(threshold: float, seed: int) -> dict:
    data = load_3d()
    if data is None:
        return {}
    rows, vols = data
    subject = [r["subject"] for r in rows]
    t0 = time.perf_counter()
    res = dup.find_groups(vols, threshold=threshold)
    seconds = time.perf_counter() - t0
    same = res.group[:, None] == res.group[None, :]
    upper = np.triu(np.ones_like(same), 1)
    subj = np.array(subject)
    cross = int((same & upper & (subj[:, None] != subj[None, :])).sum())
    within = int((same & upper & (subj[:, None] == subj[None, :])).sum())
    within_total = int((upper & (subj[:, None] == subj[None, :])).sum())
    rng = np.random.default_rng(seed)
    images, truth, kinds = list(vols), list(range(len(vols))), [None] * len(vols)
    for kind in VOLUME_KINDS:
        for k in rng.choice(len(vols), 6, replace=False):
            images.append(volume_copy(vols[k], kind, rng))
            truth.append(int(k))
            kinds.append(kind)
    res2 = dup.find_groups(images, threshold=threshold)
    truth = np.asarray(truth)
    hit = res2.group[len(vols):] == res2.group[truth[len(vols):]]
    by_kind = {k: float(hit[np.asarray(kinds[len(vols):]) == k].mean()) for k in VOLUME_KINDS}
    names = [r["file"] for r in rows]
    print(f"\nbrain-mri-3d ({len(vols)} volumes, {len(set(subject))} subjects), find_groups at {threshold}: "
          f"{1e3 * seconds / len(vols):.0f} ms/volume; groups: "
          + "; ".join(" + ".join(names[k] for k in g) for g in res.groups))
    print(f"  different-subject pairs grouped {cross}; same-subject pairs grouped {within}/{within_total} "
          f"(other sequences of one subject: informative); copies recall by kind: "
          + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items()))
    return {"cross_subject_pairs": cross, "same_subject_pairs": within, "same_subject_total": within_total,
            "copy_recall_by_kind": by_kind, "ms_per_volume": 1e3 * seconds / len(vols)}


# ---- main ----------------------------------------------------------------------------------------


def machine() -> dict:
    model, flags = platform.processor() or "?", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "cores": os.cpu_count(),
            "load_avg": [round(x, 1) for x in os.getloadavg()], "numpy": np.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def scaling(n: int, seed: int) -> dict:
    """Time and peak traced memory of the all-pairs thumbnail stage on N random thumbnails (the
    alignment of candidates comes on top: about ``CANDIDATES`` pairs per image at the ms/pair above)."""
    rng = np.random.default_rng(seed)
    thumbs = rng.standard_normal((n, 32, 32)).astype(np.float32)
    thumbs -= thumbs.mean(axis=(1, 2), keepdims=True)
    thumbs /= np.linalg.norm(thumbs.reshape(n, -1), axis=1)[:, None, None]
    tracemalloc.start()
    t0 = time.perf_counter()
    dup.thumbnail_pairs(thumbs, dup.SURE_NCC, dup.CANDIDATE_FLOOR, dup.CANDIDATES, flips=True)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"n": n, "seconds": round(seconds, 2), "peak_mb": round(peak / 2**20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-kind", type=int, default=30, help="copies per kind of copy (default 30)")
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--quick", action="store_true", help="10 copies per kind, N=1000 for the scaling check")
    p.add_argument("--json", type=Path, help="write every row here (outside the repository)")
    p.add_argument("--show", type=int, default=12, help="print this many of the closest distinct pairs")
    args = p.parse_args(argv)
    per_kind = 10 if args.quick else args.per_kind
    info = machine()
    print(f"machine: {info}")
    report: dict = {"machine": info, "default": {"method": dup.METHOD, "threshold": dup.DEFAULT_THRESHOLD},
                    "rows": []}

    four = load_4class()
    seg = load_seg2d()
    table = []
    all_sims = {}
    for method in args.methods:
        build, thresholds = METHODS[method]
        sims = {}
        if four:
            names, images, decode = four
            report["decode_s_per_image"] = decode
            sims["4class"] = build(images)
            core, truth_core, kinds_core = assemble(images, CORE_KINDS, per_kind, args.seed)
            sims["assembled"] = build(core)
            extra, truth_extra, kinds_extra = assemble(images, EXTRA_KINDS, per_kind, args.seed + 1)
            sims["extra"] = build(extra)
        if seg:
            rows, seg_images = seg
            sims["seg2d"] = build(seg_images)
        all_sims[method] = sims
        per_image = np.mean([v[1] for v in sims.values()])
        print(f"\n{method}: {1e3 * per_image:.2f} ms/image for features; "
              + ", ".join(f"{k} pairwise {v[2]:.3f} s (N={len(v[0])})" for k, v in sims.items()))
        if four:  # margins: the closest distinct pair against the farthest copy
            s4 = sims["4class"][0]
            i, j = np.unravel_index(np.argsort(-np.triu(s4, 1), axis=None)[: args.show], s4.shape)
            print("  closest distinct pairs in brain-tumor-mri-4class (score):")
            for a, b in zip(i, j):
                print(f"    {s4[a, b]:+.4f}  {names[a]}  {names[b]}")
            sa = sims["assembled"][0]
            n0 = len(images)
            copy_score = np.array([sa[k, truth_core[k]] for k in range(n0, len(core))])
            worst = np.argsort(copy_score)[:5]
            print("  copies farthest from their source (score):")
            for w in worst:
                print(f"    {copy_score[w]:+.4f}  {kinds_core[n0 + w]} of {names[truth_core[n0 + w]]}")
            finite = copy_score[np.isfinite(copy_score)]
            if len(finite) < len(copy_score):
                print(f"  {len(copy_score) - len(finite)} copies were not a candidate pair with their own source "
                      f"(-inf; they can still join its group through another copy)")
            report.setdefault("margins", {})[method] = {
                "closest_distinct": float(s4[i[0], j[0]]), "farthest_copy": float(finite.min()),
                "copies_not_scored": int(len(copy_score) - len(finite)),
                "copy_score_quantiles": {q: float(np.quantile(finite, q)) for q in (0.0, 0.01, 0.05, 0.5)}}
        for t in thresholds:
            cut = _similarity(method, t)
            row = {"method": method, "threshold": t}
            if four:
                pred = components(sims["4class"][0], cut)
                counts = np.bincount(pred)
                row["4class_groups"] = int((counts >= 2).sum())
                row["4class_grouped_images"] = int(counts[counts >= 2].sum())
                row["4class_pairs"] = _pairs(pred)
                pred = components(sims["assembled"][0], cut)
                sc = pair_scores(pred, truth_core)
                row.update({f"asm_{k}": v for k, v in sc.items()})
                n0 = len(images)
                hit = pred[n0:] == pred[truth_core[n0:]]
                row["asm_copy_recall"] = float(hit.mean())
                row["asm_copy_recall_by_kind"] = {k: float(hit[np.asarray(kinds_core[n0:]) == k].mean())
                                                  for k in CORE_KINDS}
                # groups holding two or more distinct sources
                src_per_group = {}
                for g, s in zip(pred, truth_core):
                    src_per_group.setdefault(g, set()).add(s)
                row["asm_merged_groups"] = sum(len(v) > 1 for v in src_per_group.values())
                pred = components(sims["extra"][0], cut)
                hit = pred[n0:] == pred[truth_extra[n0:]]
                row["extra_recall_by_kind"] = {k: float(hit[np.asarray(kinds_extra[n0:]) == k].mean())
                                               for k in EXTRA_KINDS}
            if seg:
                pred = components(sims["seg2d"][0], cut)
                patient = np.array([r["patient"] for r in rows])
                slc = np.array([int(r["slice"]) for r in rows])
                same = pred[:, None] == pred[None, :]
                upper = np.triu(np.ones_like(same), 1)
                cross = (patient[:, None] != patient[None, :]) & upper
                adjacent = (patient[:, None] == patient[None, :]) & (np.abs(slc[:, None] - slc[None, :]) == 1) & upper
                row["seg_cross_patient_pairs"] = int((same & cross).sum())
                row["seg_adjacent_grouped"] = int((same & adjacent).sum())
                row["seg_adjacent_total"] = int(adjacent.sum())
            report["rows"].append(row)
            table.append(row)

    # The library's own path for its default, checked against the matrix computation above.
    if four:
        names, images, _ = four
        core, truth_core, kinds_core = assemble(images, CORE_KINDS, per_kind, args.seed)
        t0 = time.perf_counter()
        result = dup.find_groups(core)
        seconds = time.perf_counter() - t0
        sc = pair_scores(result.group, truth_core)
        print(f"\nfind_groups (default {dup.METHOD}, threshold {dup.DEFAULT_THRESHOLD}) on the assembled set: "
              f"N={len(core)}, {seconds:.2f} s ({1e3 * seconds / len(core):.2f} ms/image), "
              f"{result.num_groups} groups, {result.num_grouped_images} images grouped, {result.num_exact} exact; "
              f"pair precision {sc['precision']:.4f} recall {sc['recall']:.4f}")
        report["find_groups_assembled"] = {"n": len(core), "seconds": seconds, "num_aligned": result.num_aligned, **sc}
        if "aligned" in all_sims:
            same = pair_scores(result.group, components(all_sims["aligned"]["assembled"][0], dup.DEFAULT_THRESHOLD))
            print(f"  find_groups agrees with the bench's 'aligned' rows: {same['precision'] == same['recall'] == 1.0}")
        r4 = dup.find_groups(images)
        print(f"find_groups on brain-tumor-mri-4class: {r4.num_groups} invented groups:")
        for g in r4.groups:
            print("    " + " + ".join(names[k] for k in g))
        for (x, y), score, kind in zip(r4.pairs, r4.scores, r4.kinds):
            print(f"      evidence {kind} {score:.4f}: {names[x]} ~ {names[y]}")
        report["find_groups_4class"] = [[names[k] for k in g] for g in r4.groups]
    if seg:
        rows, seg_images = seg
        rs = dup.find_groups(seg_images)
        patient = [r["patient"] for r in rows]
        mixed = [g for g in rs.groups if len({patient[k] for k in g}) > 1]
        print(f"find_groups on brain-mri-seg2d: {rs.num_groups} groups, {rs.num_grouped_images} images; "
              f"{len(mixed)} span patients" + "".join(f"\n    {[rows[k]['image'] for k in g]}" for g in mixed))
        report["find_groups_seg2d_mixed"] = [[rows[k]["image"] for k in g] for g in mixed]
    report["brain_mri_3d"] = bench_3d(dup.DEFAULT_THRESHOLD, args.seed)
    for n in ([1000] if args.quick else [1000, 5000]):
        s = scaling(n, args.seed)
        print(f"thumbnail_pairs scaling: N={n}: {s['seconds']} s, peak traced memory {s['peak_mb']} MB")
        report.setdefault("scaling", []).append(s)

    print(f"\n== summary ({info['date']}, {info['cpu']}, avx2={info['avx2']}, avx512f={info['avx512f']}, "
          f"{info['cores']} cores, load {info['load_avg']}) ==")
    print("4class: invented groups / images / pairs among 394 curated images (want 0). "
          "asm: assembled set, pairwise precision/recall and copy recall. seg: cross-patient pairs (want 0), "
          "adjacent-slice pairs grouped / total.")
    head = f"{'method':<17}{'thr':>6} | {'4class g/img/pairs':>18} | {'asm P':>7}{'asm R':>7}{'copyR':>7}{'merged':>7} | " \
           f"{'seg cross':>9}{'seg adj':>10} | worst core kinds (copy recall)"
    print(head)
    print("-" * len(head))
    for row in table:
        worst = ""
        if "asm_copy_recall_by_kind" in row:
            bad = sorted(row["asm_copy_recall_by_kind"].items(), key=lambda kv: kv[1])[:3]
            worst = ", ".join(f"{k} {v:.2f}" for k, v in bad if v < 1.0)
        four_s = f"{row.get('4class_groups', '-')}/{row.get('4class_grouped_images', '-')}/{row.get('4class_pairs', '-')}"
        print(f"{row['method']:<17}{row['threshold']:>6} | {four_s:>18} | "
              f"{row.get('asm_precision', float('nan')):>7.3f}{row.get('asm_recall', float('nan')):>7.3f}"
              f"{row.get('asm_copy_recall', float('nan')):>7.3f}{row.get('asm_merged_groups', '-'):>7} | "
              f"{row.get('seg_cross_patient_pairs', '-'):>9}"
              f"{str(row.get('seg_adjacent_grouped', '-')) + '/' + str(row.get('seg_adjacent_total', '-')):>10} | {worst}")
    print("\nextra kinds (informative), copy recall per kind:")
    for row in table:
        if "extra_recall_by_kind" in row:
            print(f"  {row['method']:<17}{row['threshold']:>6}  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in row["extra_recall_by_kind"].items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
