"""Real inputs in: the embedded cohort, class folders of images or NIfTI, or NIfTI with labels.csv.

:func:`load_source` turns ``data.source`` into a :class:`RawSet` of raw scans, each still in its
own size and scanner units (preprocessing normalises). Accepted layouts:

- ``None``: the embedded cohort (:mod:`raysynth.data.phantom`).
- ``DIR/<class>/<file>``: one subfolder per class holding 2D images (PNG, JPEG, BMP, TIFF; read
  as one grey channel) or NIfTI volumes.
- ``DIR/labels.csv`` with columns ``file,label`` (``file`` relative to DIR, ``label`` a class
  name or an integer), optionally ``subject``; other columns are ignored.
- ``DIR/x.png`` beside ``DIR/x_seg.png`` with no class subfolders, for ``task=segmentation``: a
  flat segmentation folder. Its two classes are ``no_lesion`` and ``lesion``: whether a scan's
  mask is empty, so folds are stratified by it and the generator is conditioned on it.

Subjects: every record of one subject stays in one fold. A subject is one file, unless
``labels.csv`` has a ``subject`` column, the folder holds a ``subjects.csv`` (``file,subject``),
or ``data.subject_pattern`` is a regular expression whose first group, matched on the file name,
is the subject id (``^(TCGA_[A-Z]{2}_[0-9]{4})``). Subject ids are replaced by ``p0000``,
``p0001``, ... in sorted order, so patient names never travel further than the fingerprint.

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
import re
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
FLAT_CLASSES = ["no_lesion", "lesion"]
"""The classes of a flat segmentation folder: whether a scan's mask is empty."""


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
    flat = data_cfg.task == "segmentation" and not (root / "labels.csv").is_file() and not any(
        p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    if isinstance(data_cfg.channels, list):
        entries = _one_entry_per_scan(root, entries, data_cfg.channels)
    subject_keys = _subject_keys(root, entries, data_cfg)
    entries = [(path, label) for path, label, _ in entries]
    present = [0, 1] if flat else sorted({label for _, label in entries})
    if data_cfg.task == "classification" and len(present) < 2:
        raise InputError(f"data.source: only one class ({class_names[present[0]]!r}) in {root}; "
                         f"classification needs at least two")
    nifti = [_is_nifti(p) for p, _ in entries]  # (path, label)
    if any(nifti) and not all(nifti):
        raise InputError(f"data.source: {root} mixes NIfTI volumes and 2D images")
    kind = "nifti" if all(nifti) else "images"
    if kind == "images" and data_cfg.dims == 3:
        raise InputError(f"data.dims=3 needs NIfTI volumes, but {root} holds 2D images")

    scans: list[RawScan] = []
    skipped: list[str] = []
    anonymous = {key: f"p{i:04d}" for i, key in enumerate(sorted({k for k in subject_keys if k is not None}))}
    for index, (path, label) in enumerate(entries):
        rel = path.relative_to(root).as_posix()
        try:
            loaded = _load_entry(root, path, rel, index, label, data_cfg)
            for scan in loaded:
                if subject_keys[index] is not None:
                    scan.subject = anonymous[subject_keys[index]]
                if flat:  # the class of a flat segmentation folder: does the mask show a lesion?
                    scan.label = int(scan.mask is not None and bool(np.any(scan.mask)))
            scans.extend(loaded)
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
    if lost and flat:
        raise InputError(f"data.source: every mask in {root} is {'empty' if lost[0] == 'lesion' else 'non-empty'}; "
                         "a flat segmentation folder needs scans with and without a lesion")
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
        loose = sorted(p for p in root.iterdir() if (p.is_file() or p.is_symlink()) and _is_input(p, data_cfg.mask_suffix))
        if loose and data_cfg.task == "segmentation":  # a flat folder of x.png + x_seg.png pairs
            return [(p, 0, None) for p in loose], list(FLAT_CLASSES)
        if loose:
            raise InputError(f"data.source: {root} has files but no class subfolders and no labels.csv "
                             "(a flat folder of images with masks beside them needs data.task=segmentation)")
        raise InputError(f"data.source: empty folder, no images found in {root}")
    entries = []
    for label, folder in enumerate(folders):
        # Links named like images are kept even when broken or looping: they must be reported, not dropped.
        files = sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and _is_input(p, data_cfg.mask_suffix))
        if not files and any(folder.iterdir()):
            logger.warning("class folder %s holds no images", folder)
        entries += [(p, label, None) for p in files]
    names = [f.name for f in folders]
    used = sorted({label for _, label, _ in entries})
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
    # Containment by name, not by link target: a folder of links to files kept elsewhere is fine.
    top = Path(os.path.normpath(root.absolute()))
    outside = [r["file"] for r in rows if not Path(os.path.normpath(top / r["file"])).is_relative_to(top)]
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
    has_subject = "subject" in rows[0]
    if has_subject:
        blank = [r["file"] for r in rows if not r.get("subject")]
        if blank:
            raise InputError(f"{table}: empty subject for {blank[0]!r} (the subject column, when present, names every file's subject)")
    entries = sorted(((root / r["file"], index[r["label"]], r["subject"] if has_subject else None) for r in rows),
                     key=lambda e: e[0].as_posix())
    return entries, names


def _sequence_base(path: Path, suffixes: list[str]) -> str:
    """The scan's base name: the file's stem less a ``_<suffix>`` of ``data.channels`` (any case)."""
    stem = _stem(path)
    return next((stem[: -len(f"_{s}")] for s in suffixes if stem.lower().endswith(f"_{s}".lower())), stem)


def _one_entry_per_scan(root: Path, entries: list, suffixes: list[str]) -> list:
    """With one NIfTI file per sequence, a class folder or labels.csv lists every sequence of a
    scan: keep the first entry of each ``(folder, base)``. Sequences of one scan filed under two
    labels (or two subjects) are a one-line error naming two of the files."""
    kept: dict[tuple[Path, str], tuple] = {}
    for entry in entries:
        path, label, subject = entry
        key = (path.parent, _sequence_base(path, suffixes).lower())
        first = kept.setdefault(key, entry)
        if (first[1], first[2]) != (label, subject):
            a, b = (e[0].relative_to(root).as_posix() for e in (first, entry))
            what = "labels" if first[1] != label else "subjects"
            raise InputError(f"data.source: {a} and {b} are sequences of one scan with different {what}")
    return list(kept.values())


def _subject_keys(root: Path, entries: list[tuple[Path, int, Optional[str]]], data_cfg) -> list[Optional[str]]:
    """Each entry's subject key (None: the file is its own subject), from labels.csv's subject
    column, ``subjects.csv`` or ``data.subject_pattern``, in that order of precedence."""
    keys = [key for _, _, key in entries]
    table = root / "subjects.csv"
    if table.is_file() and all(k is None for k in keys):
        try:
            with open(table, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or not {"file", "subject"} <= {c.strip() for c in reader.fieldnames}:
                    raise InputError(f"{table}: needs the columns file,subject; found {reader.fieldnames}")
                given = {(r.get("file") or "").strip(): (r.get("subject") or "").strip() for r in reader}
        except UnicodeDecodeError as exc:
            raise InputError(f"{table}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
        rels = [path.relative_to(root).as_posix() for path, _, _ in entries]
        missing = [r for r in rels if not given.get(r)]
        if missing:
            raise InputError(f"{table}: no subject for {missing[0]!r} ({len(missing)} file(s) without one)")
        keys = [given[r] for r in rels]
    pattern = data_cfg.subject_pattern
    if pattern is not None:
        regex = re.compile(pattern)
        matches = [regex.search(path.name) for path, _, _ in entries]
        if not any(matches):
            raise InputError(f"data.subject_pattern: {pattern!r} matches no file name in {root}, "
                             f"e.g. not {entries[0][0].name!r}")
        unmatched = [path.name for (path, _, _), m in zip(entries, matches) if m is None]
        if unmatched:
            raise InputError(f"data.subject_pattern: {pattern!r} matches {len(entries) - len(unmatched)} of "
                             f"{len(entries)} file names, not {unmatched[0]!r}")
        keys = [m.group(1) for m in matches]
    return keys


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
    """The record(s) of one listed entry: one 2D picture, one volume, or the slices of a volume.

    Images come back with their channel axis, ``(C, H, W)`` or ``(C, X, Y, Z)``. ``data.channels``:

    - ``grey``: one channel (an RGB picture must have identical channels);
    - ``rgb``: a picture's three colour channels (a one-channel picture is refused);
    - a list of NIfTI suffixes ``[t1, flair, ...]``: ``path`` names one scan, given either as the
      file of any of its sequences (``x_t1.nii.gz``) or as its base name (``x``, ``x.nii.gz``); the
      files ``x_<suffix>.nii.gz`` (or ``.nii``) beside it are read and stacked in the list's order.
      They must share one grid. A missing sequence is a one-line error naming the scan and the
      sequence (skipped with a warning under ``data.bad_files=skip``). The mask is ``x_seg.*``,
      else the one beside the first sequence (``x_t1_seg.*``). A segmentation image without a mask
      is an error too, also skippable.
    """
    channels = data_cfg.channels
    if isinstance(channels, list):
        base, files = _sequence_files(path, rel, channels)
        parts = []
        for suffix, f in zip(channels, files):
            frel = f.relative_to(root).as_posix()
            arr, spacing, affine = _read_array(f, frel, is_mask=False)
            if parts and arr.shape != parts[0][0].shape:
                raise InputError(f"{rel}: sequence {suffix!r} ({frel}) has shape {arr.shape[1:]}, "
                                 f"{channels[0]!r} has {parts[0][0].shape[1:]}; the sequences of a scan must share one grid")
            parts.append((arr, spacing, affine))
        image = np.concatenate([a for a, _, _ in parts], axis=0)
        spacing, affine = parts[0][1], parts[0][2]
        mask_candidates = [path.with_name(base + ".nii.gz"), files[0]]
    else:
        image, spacing, affine = _read_array(path, rel, is_mask=False, channels=channels)
        mask_candidates = [path]
    _check_values(image, rel)  # the whole volume, not only the slices taken from it
    if data_cfg.dims == 3 and image.ndim == 4 and image.shape[3] == 1:
        raise InputError(f"{rel}: a single-slice volume {image.shape[1:]} cannot serve data.dims=3")
    mask = None
    if data_cfg.task == "segmentation":  # classification ignores masks: not even read
        mpath = next((m for m in (mask_path(c, data_cfg.mask_suffix) for c in mask_candidates) if m is not None), None)
        if mpath is None:
            # skippable: a real folder often has a few unannotated cases (brain-mri-3d's BraTS-style case)
            raise _BadFile(f"{rel}: no mask {_stem(mask_candidates[0])}{data_cfg.mask_suffix}.* beside it "
                           f"(task=segmentation needs one per image; data.bad_files=skip leaves such images out)")
        mrel = mpath.relative_to(root).as_posix()
        mask = _check_mask(_read_array(mpath, mrel, is_mask=True)[0], image.shape[1:], mrel)
    sid = f"s{index:04d}"
    if image.ndim == 3 or data_cfg.dims == 3:
        return [RawScan(sid, sid, label, image, mask, spacing, affine if image.ndim == 4 else None, rel)]
    scans = []
    for j, z in enumerate(_axial_indices(image.shape[3], data_cfg.slices_per_volume)):
        plane = np.ascontiguousarray(np.rot90(image[:, :, :, z], axes=(1, 2)))  # anterior-up axial view
        _check_values(plane, f"{rel} (slice {z})")
        mplane = None if mask is None else np.ascontiguousarray(np.rot90(mask[:, :, z]))
        scans.append(RawScan(f"{sid}_z{j:02d}", sid, label, plane, mplane, (spacing[1], spacing[0]), None, rel))
    return scans


def _sequence_files(path: Path, rel: str, suffixes: list[str]) -> tuple[str, list[Path]]:
    """``(base, files)`` for a scan of one NIfTI file per sequence; ``path`` is one sequence's file
    or the base name. Raises a skippable error naming the scan and the first missing sequence."""
    base = _sequence_base(path, suffixes)
    beside = {p.name.lower(): p for p in path.parent.iterdir() if p.is_file()}
    files = []
    for suffix in suffixes:  # file names matched in any case: IXI names T1 what BraTS names t1
        found = next((beside[f"{base}_{suffix}{ext}".lower()] for ext in NIFTI_SUFFIXES
                      if f"{base}_{suffix}{ext}".lower() in beside), None)
        if found is None:
            where = Path(rel).with_name(base).as_posix()
            listed = f" (listed as {rel})" if Path(rel).name != Path(where).name else ""
            raise _BadFile(f"{where}{listed}: no {suffix!r} sequence ({base}_{suffix}.nii.gz); data.channels "
                           f"asks for {suffixes}")
        files.append(found)
    return base, files


def _axial_indices(depth: int, count: int) -> list[int]:
    """``count`` axial indices spread over the central half of ``depth`` slices."""
    if count == 1 or depth == 1:
        return [depth // 2]
    if depth >= 2 * count:
        span = np.linspace(depth * 0.25, depth * 0.75 - 1, count)
    else:  # too few slices to spread out: adjacent ones around the centre
        span = np.arange(count) + (depth - count) / 2
    return sorted({int(np.clip(round(z), 0, depth - 1)) for z in span})


def _read_array(path: Path, rel: str, is_mask: bool, channels="grey") -> tuple[np.ndarray, tuple[float, ...], Optional[np.ndarray]]:
    """``(array, spacing, affine)``. Images carry a leading channel axis (``(C, H, W)`` or
    ``(1, X, Y, Z)``); masks are spatial only. ``channels`` (``grey`` or ``rgb``) applies to pictures."""
    try:
        size = path.stat().st_size
    except OSError as exc:  # a dangling or looping symlink
        raise _BadFile(f"{rel}: unreadable ({_why(exc)})") from None
    if size == 0:
        raise _BadFile(f"{rel}: zero-byte file")
    if _is_nifti(path):
        data, spacing, affine = _read_nifti(path, rel, is_mask)
        if channels == "rgb" and not is_mask:
            raise InputError(f"{rel}: a NIfTI volume, but data.channels=rgb reads colour pictures; "
                             f"name the sequences instead (data.channels=[t1, flair, ...])")
        return (data if is_mask else data[None]), spacing, affine
    data, spacing, affine = _read_picture(path, rel, is_mask, channels)
    return data, spacing, affine


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


RGB_TOLERANCE = 8
"""Grey levels by which the colour channels of a picture read as grey may differ (JPEG)."""


def _read_picture(path: Path, rel: str, is_mask: bool, channels="grey"):
    """``(C, H, W)`` float32 for an image (C = 1 for ``grey``, 3 for ``rgb``), ``(H, W)`` for a mask."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_VOXELS // 4:
                raise _BadFile(f"{rel}: implausible image size {im.size}")
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F") or (is_mask and im.mode in ("P", "L", "1")):
                data = np.asarray(im, dtype=np.float32)  # keep 16-bit grey and palette indices as they are
                colour = None
            elif is_mask:
                data, colour = np.asarray(im.convert("L"), dtype=np.float32), None
            else:
                colour = None if im.mode in ("L", "1", "LA") else np.asarray(im.convert("RGB"), dtype=np.float32)
                data = np.asarray(im.convert("L"), dtype=np.float32)
    except _BadFile:
        raise
    except Exception as exc:  # UnidentifiedImageError, truncated files, decompression bombs
        raise _BadFile(f"{rel}: unreadable image ({_why(exc)})") from None
    if is_mask:
        return data, (1.0, 1.0), None
    if channels == "rgb":
        if colour is None:
            raise InputError(f"{rel}: a one-channel (grey) picture, but data.channels=rgb needs three colour channels")
        return np.ascontiguousarray(np.moveaxis(colour, -1, 0)), (1.0, 1.0), None
    if colour is not None and (np.abs(colour - colour[..., :1]).max() > RGB_TOLERANCE):
        raise InputError(f"{rel}: a colour picture whose channels differ, but data.channels=grey; "
                         f"set data.channels=rgb to use each colour channel as a sequence")
    return data[None], (1.0, 1.0), None


def _why(exc: Exception) -> str:
    """A library's exception as one short line: the CLI prints errors as one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _check_values(image: np.ndarray, rel: str) -> None:
    """Every channel finite; not all channels one constant (one blank channel is allowed)."""
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
