"""Real inputs in: the embedded cohort, class folders of images or NIfTI, or NIfTI with labels.csv.

:func:`load_source` turns ``data.source`` into a :class:`RawSet` of raw scans, each still in its
own size and scanner units (preprocessing normalises). Accepted layouts:

- ``None``: the embedded cohort (:mod:`raysynth.data.phantom`).
- ``DIR/<class>/<file>``: one subfolder per class holding 2D images (PNG, JPEG, BMP, TIFF; read
  as one grey channel) or NIfTI volumes.
- ``DIR/labels.csv`` with columns ``file,label`` (``file`` relative to DIR, ``label`` a class
  name or an integer).

Segmentation masks sit beside their image: ``x.nii.gz`` -> ``x_seg.nii.gz``, ``x.png`` ->
``x_seg.png`` (the suffix is ``data.mask_suffix``); mask files are never taken as images.
NIfTI volumes are reoriented to canonical RAS; 2D arrays cut from them are axial planes shown
anterior-up in the neurological convention: rows run anterior to posterior, columns from the
patient's left to right.

Records are named ``s0000``, ``s0001``, ... in sorted file order (``s0003_z01`` for the second slice
of a volume), so file names never travel further; :attr:`RawScan.source` keeps the relative path
for the fingerprint only.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from raysynth.data.phantom import cohort_from_config
from raysynth.data.raw import RawScan, RawSet
from raysynth.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
MAX_VOXELS = 2**28
"""Header sizes above this (a 640^3 volume, a 16k^2 image) are refused before any data is read."""
MAX_MASK_LABEL = 15


class _BadFile(InputError):
    """A file that cannot be used; ``bad_files="skip"`` leaves it out instead of stopping."""


def load_source(data_cfg) -> RawSet:
    """Load ``data_cfg.source`` (see the module docstring). Raises :class:`InputError` naming the
    file or cause for anything unusable."""
    if data_cfg.source is None:
        return cohort_from_config(data_cfg)
    root = Path(data_cfg.source).expanduser()
    if not root.exists():
        raise InputError(f"data.source: folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"data.source: {root} is not a folder")
    entries, class_names = (_csv_entries if (root / "labels.csv").is_file() else _folder_entries)(root, data_cfg)
    if not entries:
        raise InputError(f"data.source: empty folder, no images found in {root}")
    present = sorted({label for _, label in entries})
    if data_cfg.task == "classification" and len(present) < 2:
        raise InputError(f"data.source: only one class ({class_names[present[0]]!r}) in {root}; "
                         f"classification needs at least two")
    nifti = [_is_nifti(p) for p, _ in entries]
    if any(nifti) and not all(nifti):
        raise InputError(f"data.source: {root} mixes NIfTI volumes and 2D images")
    kind = "nifti" if all(nifti) else "images"
    if kind == "images" and data_cfg.dims == 3:
        raise InputError(f"data.dims=3 needs NIfTI volumes, but {root} holds 2D images")

    scans: list[RawScan] = []
    skipped: list[str] = []
    for index, (path, label) in enumerate(entries):
        rel = path.relative_to(root).as_posix()
        try:
            scans.extend(_load_entry(root, path, rel, index, label, data_cfg))
        except _BadFile as exc:
            if data_cfg.bad_files != "skip":
                raise
            logger.warning("skipping %s", exc)
            skipped.append(rel)
        if (index + 1) % 100 == 0:
            logger.info("sources: read %d/%d files", index + 1, len(entries))
    if not scans:
        raise InputError(f"data.source: no readable images in {root} ({len(skipped)} skipped)")
    left = {s.label for s in scans}
    lost = [name for i, name in enumerate(class_names) if i in present and i not in left]
    if lost:
        raise InputError(f"data.source: every file of class {lost[0]!r} was skipped as unreadable")
    mask_names = None
    if data_cfg.task == "segmentation":
        top = max(int(s.mask.max()) for s in scans)
        mask_names = ["background"] + [f"label_{k}" for k in range(1, max(top, 1) + 1)]
    return RawSet(scans=scans, class_names=class_names, mask_names=mask_names, kind=kind, skipped=skipped)


# ---- finding files -------------------------------------------------------------------------


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_input(path: Path, mask_suffix: str) -> bool:
    if path.name.startswith(".") or not path.name.lower().endswith(IMAGE_SUFFIXES + NIFTI_SUFFIXES):
        logger.debug("ignoring non-image file %s", path)
        return False
    return not _stem(path).endswith(mask_suffix)


def _folder_entries(root: Path, data_cfg) -> tuple[list[tuple[Path, int]], list[str]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    real_root = root.resolve()
    for p in folders:  # a link back up would turn every image into a second class
        real = p.resolve()
        if real == real_root or real_root.is_relative_to(real):
            raise InputError(f"data.source: {p.name} is a symlink loop back to {root}")
    if not folders:
        loose = [p for p in root.iterdir() if _is_input(p, data_cfg.mask_suffix)]
        if loose:
            raise InputError(f"data.source: {root} has files but no class subfolders and no labels.csv")
        raise InputError(f"data.source: empty folder, no images found in {root}")
    entries = []
    for label, folder in enumerate(folders):
        # Links named like images are kept even when broken or looping: they must be reported, not dropped.
        files = sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and _is_input(p, data_cfg.mask_suffix))
        if not files and any(folder.iterdir()):
            logger.warning("class folder %s holds no images", folder)
        entries += [(p, label) for p in files]
    names = [f.name for f in folders]
    used = sorted({label for _, label in entries})
    if used and len(used) < len(names):  # a class with no images at all cannot be learned or split
        empty = [names[i] for i in range(len(names)) if i not in used]
        raise InputError(f"data.source: class folder {empty[0]!r} in {root} holds no images")
    return entries, names


def _csv_entries(root: Path, data_cfg) -> tuple[list[tuple[Path, int]], list[str]]:
    table = root / "labels.csv"
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"file", "label"} <= {c.strip() for c in reader.fieldnames}:
                raise InputError(f"{table}: needs the columns file,label; found {reader.fieldnames}")
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except UnicodeDecodeError as exc:
        raise InputError(f"{table}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    rows = [r for r in rows if r.get("file")]
    if not rows:
        raise InputError(f"{table}: empty, no rows")
    outside = [r["file"] for r in rows if not (root / r["file"]).resolve().is_relative_to(root.resolve())]
    if outside:
        raise InputError(f"{table}: file {outside[0]!r} lies outside {root}")
    absent = [r["file"] for r in rows if not (root / r["file"]).is_file()]
    if absent:
        raise InputError(f"{table}: names {len(absent)} absent file(s), e.g. {absent[0]!r}")
    files = [r["file"] for r in rows]
    if len(set(files)) != len(files):
        raise InputError(f"{table}: lists a file twice, e.g. {next(f for f in files if files.count(f) > 1)!r}")
    raw = [r["label"] for r in rows]
    if any(not v for v in raw):
        raise InputError(f"{table}: empty label for {rows[raw.index('')]['file']!r}")
    numeric = all(v.lstrip("-").isdigit() for v in raw)
    names = sorted(set(raw), key=int) if numeric else sorted(set(raw))
    index = {name: i for i, name in enumerate(names)}
    entries = sorted(((root / r["file"], index[r["label"]]) for r in rows), key=lambda e: e[0].as_posix())
    return entries, names


def mask_path(path: Path, mask_suffix: str) -> Optional[Path]:
    """The mask beside ``path`` (``x.nii.gz`` -> ``x_seg.nii.gz``, ``x.jpg`` -> ``x_seg.png``), or None."""
    stem = _stem(path)
    own = path.name[len(stem):]
    for suffix in (own, ".png", ".nii.gz", ".nii", ".tif", ".tiff", ".bmp"):
        candidate = path.with_name(f"{stem}{mask_suffix}{suffix}")
        if candidate.is_file():
            return candidate
    return None


# ---- reading one file ----------------------------------------------------------------------


def _load_entry(root: Path, path: Path, rel: str, index: int, label: int, data_cfg) -> list[RawScan]:
    image, spacing, affine = _read_array(path, rel, is_mask=False)
    _check_values(image, rel)  # the whole volume, not only the slices taken from it
    if data_cfg.dims == 3 and image.ndim == 3 and image.shape[2] == 1:
        raise InputError(f"{rel}: a single-slice volume {image.shape} cannot serve data.dims=3")
    mask = None
    if data_cfg.task == "segmentation":  # classification ignores masks: not even read
        mpath = mask_path(path, data_cfg.mask_suffix)
        if mpath is None:
            raise InputError(f"{rel}: no mask {_stem(path)}{data_cfg.mask_suffix}.* beside it "
                             f"(task=segmentation needs one per image)")
        mrel = mpath.relative_to(root).as_posix()
        mask = _check_mask(_read_array(mpath, mrel, is_mask=True)[0], image.shape, mrel)
    sid = f"s{index:04d}"
    if image.ndim == 2 or data_cfg.dims == 3:
        return [RawScan(sid, sid, label, image, mask, spacing, affine if image.ndim == 3 else None, rel)]
    scans = []
    for j, z in enumerate(_axial_indices(image.shape[2], data_cfg.slices_per_volume)):
        plane = np.ascontiguousarray(np.rot90(image[:, :, z]))  # anterior-up axial view
        _check_values(plane, f"{rel} (slice {z})")
        mplane = None if mask is None else np.ascontiguousarray(np.rot90(mask[:, :, z]))
        scans.append(RawScan(f"{sid}_z{j:02d}", sid, label, plane, mplane, (spacing[1], spacing[0]), None, rel))
    return scans


def _axial_indices(depth: int, count: int) -> list[int]:
    """``count`` axial indices spread over the central half of ``depth`` slices."""
    if count == 1 or depth == 1:
        return [depth // 2]
    if depth >= 2 * count:
        span = np.linspace(depth * 0.25, depth * 0.75 - 1, count)
    else:  # too few slices to spread out: adjacent ones around the centre
        span = np.arange(count) + (depth - count) / 2
    return sorted({int(np.clip(round(z), 0, depth - 1)) for z in span})


def _read_array(path: Path, rel: str, is_mask: bool) -> tuple[np.ndarray, tuple[float, ...], Optional[np.ndarray]]:
    try:
        size = path.stat().st_size
    except OSError as exc:  # a dangling or looping symlink
        raise _BadFile(f"{rel}: unreadable ({_why(exc)})") from None
    if size == 0:
        raise _BadFile(f"{rel}: zero-byte file")
    return _read_nifti(path, rel, is_mask) if _is_nifti(path) else _read_picture(path, rel, is_mask)


def _read_nifti(path: Path, rel: str, is_mask: bool):
    import nibabel as nib

    try:
        img = nib.load(path)
        shape = tuple(int(n) for n in img.header.get_data_shape())
    except Exception as exc:
        raise _BadFile(f"{rel}: unreadable NIfTI ({_why(exc)})") from None
    # Size from the header, before a single voxel is read: a corrupt header must not exhaust memory.
    if not shape or int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS or max(shape) > 4096:
        raise _BadFile(f"{rel}: implausible header size {shape}")
    if min(shape) < 1:
        raise _BadFile(f"{rel}: empty dimension in header size {shape}")
    if not np.isfinite(img.affine).all():
        raise _BadFile(f"{rel}: non-finite voxel-to-world affine")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) == 4 or len(shape) > 4:
        raise InputError(f"{rel}: a {len(shape)}D NIfTI {shape}; a 3D volume (or 2D slice) is expected")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape + (1,) * (3 - len(shape)))
    except Exception as exc:  # truncated gzip, short data block, ...
        raise _BadFile(f"{rel}: unreadable NIfTI data ({_why(exc)})") from None
    # What nib.as_closest_canonical does, but also for 2D and squeezed 4D arrays.
    ornt = nib.orientations.io_orientation(img.affine)
    data = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    spacing = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return data, spacing, affine


def _read_picture(path: Path, rel: str, is_mask: bool):
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_VOXELS // 4:
                raise _BadFile(f"{rel}: implausible image size {im.size}")
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F") or (is_mask and im.mode in ("P", "L", "1")):
                data = np.asarray(im, dtype=np.float32)  # keep 16-bit grey and palette indices as they are
            else:
                data = np.asarray(im.convert("L"), dtype=np.float32)
    except _BadFile:
        raise
    except Exception as exc:  # UnidentifiedImageError, truncated files, decompression bombs
        raise _BadFile(f"{rel}: unreadable image ({_why(exc)})") from None
    return data, (1.0, 1.0), None


def _why(exc: Exception) -> str:
    """A library's exception as one short line: the CLI prints errors as one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _check_values(image: np.ndarray, rel: str) -> None:
    if not np.isfinite(image).all():
        raise _BadFile(f"{rel}: contains NaN or Inf values")
    if float(image.max()) == float(image.min()):
        raise _BadFile(f"{rel}: constant image (every value is {float(image.min())})")


def _check_mask(mask: np.ndarray, shape: tuple[int, ...], rel: str) -> np.ndarray:
    if mask.shape != shape:
        raise InputError(f"{rel}: mask shape {mask.shape} differs from its image's {shape}")
    if not np.isfinite(mask).all() or (mask != np.round(mask)).any():
        raise InputError(f"{rel}: mask values must be whole numbers")
    values = np.unique(mask)
    if set(values.tolist()) <= {0.0, 255.0}:  # a black-and-white picture mask: 255 is foreground
        mask = mask / 255.0
    elif values.min() < 0 or values.max() > MAX_MASK_LABEL:
        raise InputError(f"{rel}: mask labels {values.min():g}..{values.max():g} are outside 0..{MAX_MASK_LABEL}")
    return mask.astype(np.uint8)


def source_signature(source: Optional[str]) -> Optional[str]:
    """A hash of every file's path, size and mtime under ``source`` (None for the embedded cohort):
    the config digest alone cannot see files added to or changed in the folder."""
    if source is None:
        return None
    root = Path(source).expanduser()
    if not root.is_dir():
        return None  # load_source reports the missing folder
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        # fsencode: a file name need not be valid UTF-8 (surrogate escapes would not encode).
        h.update(os.fsencode(path.relative_to(root)) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
