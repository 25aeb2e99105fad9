"""Where each stage writes its artifact: one folder per stage under the output root.

```
OUT/prepared/    data.parquet, fingerprint.json, splits.json
OUT/ddpm/fold_k/ checkpoint/, config.json, train_ids.json, metrics.jsonl
OUT/synthetic/fold_k/ part-*.parquet, nifti/*.nii.gz, manifest.json, grid_*.png
OUT/quality/     quality.json, figures
OUT/study/       results.parquet, predictions.parquet
OUT/report/      report.json, report.md, *.png
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, out: str | os.PathLike) -> "Layout":
        return cls(Path(out).expanduser().resolve())

    # prepare
    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def data_parquet(self) -> Path:
        return self.prepared / "data.parquet"

    @property
    def fingerprint(self) -> Path:
        return self.prepared / "fingerprint.json"

    @property
    def splits(self) -> Path:
        return self.prepared / "splits.json"

    # train
    def ddpm(self, fold: int) -> Path:
        return self.root / "ddpm" / f"fold_{fold}"

    # sample
    def synthetic(self, fold: int) -> Path:
        return self.root / "synthetic" / f"fold_{fold}"

    @property
    def quality(self) -> Path:
        return self.root / "quality"

    @property
    def study(self) -> Path:
        return self.root / "study"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def ray_storage(self) -> Path:
        """Ray Train / Tune run folders (checkpoints, trial state)."""
        return self.root / "ray"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename), so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


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
