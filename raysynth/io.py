"""The one atomic write: a file appears whole under its name or not at all.

Every artifact is written to a hidden temporary name beside its target and renamed over it
(a rename within one folder is atomic on POSIX filesystems), so a reader, a resumed stage or an
object-store push never sees half a file, and a crash leaves at most a stray ``.name.tmp``.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, rename it
    over ``path``. On an error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The process id keeps concurrent writers (two actors, two trials) apart; the target's own
    # suffixes stay last, because some writers choose the format by suffix (nibabel, matplotlib).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{''.join(path.suffixes)}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        if tmp.exists() and tmp.is_file():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON atomically, so readers never see half a file (numpy scalars and paths allowed).

    NaN and infinities, which ``jq`` and a browser's ``JSON.parse`` reject, are written as ``null``."""
    write_text(path, json.dumps(strict(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def strict(obj: Any) -> Any:
    """``obj`` with numpy values made plain and every non-finite float replaced by None."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return strict(_json_default(obj))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_table(table: Any, path: str | os.PathLike) -> None:
    """Write a pyarrow Table as Parquet atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
