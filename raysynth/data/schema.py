"""The record layout shared by every stage: an in-memory :class:`ImageSet` and its Parquet schema.

One row per 2D image or 3D volume. Arrays are stored as raw little-endian bytes with their
shape beside them (channel axis first), so the files are plain Parquet that any Arrow reader can open.

``data.parquet`` (prepared real data) columns:

========== ================= ==============================================================
column     type              meaning
========== ================= ==============================================================
id         string            unique record id (``s0042``; ``s0042_z03`` for a NIfTI slice)
subject    string            the scan/volume the record came from; splits keep it whole
label      int32             class index into ``fingerprint.json``'s ``class_names``
image      binary            float32 C-order intensities in [-1, 1], shape = ``shape``
mask       binary (null)     uint8 label map of the spatial shape ``shape[1:]`` (segmentation only)
shape      list<int32>       channels, then the spatial shape: ``[C, H, W]`` or ``[C, D, H, W]``
spacing    list<float32>     voxel size in mm per spatial axis
========== ================= ==============================================================

Synthetic shards (``part-*.parquet``) carry the same columns plus provenance:
``fold`` (int32), ``generator_id`` (string), ``seed`` (int64), ``sampler`` (string),
``steps`` (int32), ``checksum`` (sha256 of image and mask bytes) and ``path`` (the sample's
NIfTI file relative to the shard folder, 3D only; else null). Synthetic ``subject`` is
``synthetic``: no source identifier ever reaches a synthetic file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysynth.io import atomic_path

IMAGE_DTYPE = np.dtype("<f4")
MASK_DTYPE = np.dtype("u1")

REAL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("subject", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary(), nullable=True),
        pa.field("shape", pa.list_(pa.int32()), nullable=False),
        pa.field("spacing", pa.list_(pa.float32()), nullable=False),
    ]
)

PROVENANCE_FIELDS = [
    pa.field("fold", pa.int32(), nullable=False),
    pa.field("generator_id", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("sampler", pa.string(), nullable=False),
    pa.field("steps", pa.int32(), nullable=False),
    pa.field("checksum", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=True),
]
SYNTHETIC_SCHEMA = pa.schema(list(REAL_SCHEMA) + PROVENANCE_FIELDS)


@dataclass
class ImageSet:
    """A batch of records in memory.

    Shapes: ``images`` is ``(N, C, *spatial)`` float32 in [-1, 1], always with the channel axis
    (C = 1 for grey; C sequences such as T1, FLAIR, T1c otherwise); ``masks`` is ``(N, *spatial)``
    uint8 or None (one label map for all channels); ``labels`` is ``(N,)`` int64. ``spacing`` has
    one entry per spatial axis, so a ``(N, *spatial)`` array without the channel axis is refused.
    """

    ids: list[str]
    subjects: list[str]
    labels: np.ndarray
    images: np.ndarray
    masks: Optional[np.ndarray] = None
    spacing: tuple[float, ...] = ()
    extra: dict[str, list] = field(default_factory=dict)
    """Extra per-record columns (synthetic provenance), each a list of length N."""

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(self.subjects) != n or len(self.labels) != n or len(self.images) != n:
            raise ValueError(
                f"ImageSet: ids ({n}), subjects ({len(self.subjects)}), labels ({len(self.labels)}) "
                f"and images ({len(self.images)}) must have one entry per record"
            )
        if self.images.ndim not in (4, 5):
            raise ValueError(f"ImageSet: images of shape {self.images.shape} must be (N, C, H, W) or (N, C, D, H, W): "
                             f"the channel axis is explicit (add it with images[:, None])")
        if self.spacing and len(self.spacing) != self.images.ndim - 2:
            raise ValueError(f"ImageSet: spacing {tuple(self.spacing)} has {len(self.spacing)} entries; images of shape "
                             f"{self.images.shape} have {self.images.ndim - 2} spatial axes (N, C, *spatial)")
        if self.masks is not None and self.masks.shape != self.images.shape[:1] + self.images.shape[2:]:
            raise ValueError(f"ImageSet: masks shape {self.masks.shape} differs from the images' (N, *spatial) "
                             f"{self.images.shape[:1] + self.images.shape[2:]}")
        if not self.spacing:
            self.spacing = (1.0,) * (self.images.ndim - 2)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[2:])

    @property
    def num_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def record_shape(self) -> tuple[int, ...]:
        """``(C, *spatial)``: one record's image shape, as stored in the ``shape`` column."""
        return tuple(self.images.shape[1:])

    @property
    def dims(self) -> int:
        return self.images.ndim - 2

    def select(self, index: Sequence[int] | np.ndarray) -> "ImageSet":
        idx = np.asarray(index, dtype=np.int64)
        return ImageSet(
            ids=[self.ids[i] for i in idx],
            subjects=[self.subjects[i] for i in idx],
            labels=self.labels[idx],
            images=self.images[idx],
            masks=None if self.masks is None else self.masks[idx],
            spacing=self.spacing,
            extra={k: [v[i] for i in idx] for k, v in self.extra.items()},
        )

    def subset_ids(self, ids: Sequence[str]) -> "ImageSet":
        pos = {rid: i for i, rid in enumerate(self.ids)}
        missing = [rid for rid in ids if rid not in pos]
        if missing:
            raise KeyError(f"{len(missing)} ids not in this ImageSet, e.g. {missing[:3]}")
        return self.select([pos[rid] for rid in ids])

    @staticmethod
    def concat(parts: Sequence["ImageSet"]) -> "ImageSet":
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("ImageSet.concat: nothing to concatenate")
        with_masks = [p.masks is not None for p in parts]
        if any(with_masks) and not all(with_masks):
            raise ValueError("ImageSet.concat: some parts have masks and some do not")
        keys = set(parts[0].extra)
        return ImageSet(
            ids=[i for p in parts for i in p.ids],
            subjects=[s for p in parts for s in p.subjects],
            labels=np.concatenate([p.labels for p in parts]),
            images=np.concatenate([p.images for p in parts]),
            masks=np.concatenate([p.masks for p in parts]) if all(with_masks) else None,
            spacing=parts[0].spacing,
            extra={k: [x for p in parts for x in p.extra.get(k, [])] for k in keys if all(k in p.extra for p in parts)},
        )


def checksum(image: np.ndarray, mask: Optional[np.ndarray] = None) -> str:
    h = hashlib.sha256(np.ascontiguousarray(image, dtype=IMAGE_DTYPE).tobytes())
    if mask is not None:
        h.update(np.ascontiguousarray(mask, dtype=MASK_DTYPE).tobytes())
    return h.hexdigest()


def to_table(data: ImageSet, schema: pa.Schema = REAL_SCHEMA) -> pa.Table:
    shape = list(data.record_shape)
    cols = {
        "id": data.ids,
        "subject": data.subjects,
        "label": np.asarray(data.labels, dtype=np.int32),
        "image": [np.ascontiguousarray(a, dtype=IMAGE_DTYPE).tobytes() for a in data.images],
        "mask": [None] * len(data)
        if data.masks is None
        else [np.ascontiguousarray(m, dtype=MASK_DTYPE).tobytes() for m in data.masks],
        "shape": [shape] * len(data),
        "spacing": [list(map(float, data.spacing))] * len(data),
    }
    for f in schema:
        if f.name not in cols:
            if f.name not in data.extra:
                raise ValueError(f"to_table: column {f.name!r} is required by the schema but missing")
            cols[f.name] = data.extra[f.name]
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in schema}, schema=schema)


def from_table(table: pa.Table) -> ImageSet:
    if table.num_rows == 0:
        raise ValueError("from_table: the table has no rows")
    shapes = table.column("shape").to_pylist()
    shape = tuple(shapes[0])
    if any(tuple(s) != shape for s in shapes):
        raise ValueError("from_table: records of different shapes cannot form one ImageSet")
    spacing = tuple(table.column("spacing")[0].as_py())
    if len(shape) != len(spacing) + 1 or len(shape) not in (3, 4):
        raise ValueError(f"from_table: record shape {list(shape)} with spacing {list(spacing)} has no channel axis "
                         f"(expected [C, *spatial]): the file predates multi-channel records; run `raysynth prepare` "
                         f"(and later stages) again")
    images = np.stack([np.frombuffer(b, dtype=IMAGE_DTYPE).reshape(shape) for b in table.column("image").to_pylist()])
    raw_masks = table.column("mask").to_pylist()
    masks = None
    if any(m is not None for m in raw_masks):
        if any(m is None for m in raw_masks):
            raise ValueError("from_table: some records have masks and some do not")
        masks = np.stack([np.frombuffer(m, dtype=MASK_DTYPE).reshape(shape[1:]) for m in raw_masks])
    base = {f.name for f in REAL_SCHEMA}
    extra = {name: table.column(name).to_pylist() for name in table.column_names if name not in base}
    return ImageSet(
        ids=table.column("id").to_pylist(),
        subjects=table.column("subject").to_pylist(),
        labels=np.asarray(table.column("label").to_numpy(), dtype=np.int64),
        images=images.astype(np.float32, copy=True),
        masks=None if masks is None else masks.copy(),
        spacing=spacing,
        extra=extra,
    )


def write_parquet(data: ImageSet, path: str | Path, schema: pa.Schema = REAL_SCHEMA) -> None:
    """Write atomically: a temporary file in the same folder, then a rename."""
    with atomic_path(path) as tmp:
        pq.write_table(to_table(data, schema), tmp, compression="zstd")


def read_parquet(path: str | Path | Sequence[str | Path]) -> ImageSet:
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise ValueError("read_parquet: no files given")
    tables = [pq.read_table(p) for p in paths]
    return from_table(pa.concat_tables(tables, promote_options="default"))
