"""Where each stage writes its artifact: one folder per stage under the output root.

```
OUT/prepared/    data.parquet, fingerprint.json, splits.json, subsets.json (scarcity curve)
OUT/ddpm/fold_k/ checkpoint/, config.json, train_ids.json, metrics.jsonl
OUT/synthetic/fold_k/ part-*.parquet, nifti/*.nii.gz, manifest.json, grid_*.png
OUT/quality/     quality.json, figures
OUT/study/       results.parquet, predictions.parquet, trials/*.json, models/*.pt
OUT/robustness/  corrupted.parquet, external.parquet, external_predictions.parquet, robustness.json
OUT/report/      report.json, report.html, report.md, *.png
```

A scarcity study (``study.real_fractions``) adds one generator and one synthetic set per
(fold, fraction) below 1: ``OUT/ddpm/fold_k_p25`` for 25%, ``OUT/synthetic/fold_k_p25``. The full
training part keeps the plain ``fold_k`` names, so runs without a scarcity curve look as before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class Layout:
    """``root``: the local folder every stage reads and writes. ``remote``: the URI it mirrors
    when the output is on object storage (``--out s3://...``; see raysynth.storage), else None."""

    root: Path
    remote: Optional[str] = None

    @classmethod
    def at(cls, out: str | os.PathLike) -> "Layout":
        """A local folder, or a URI (``s3://``, ``gs://``, ``file://``...): then ``root`` is its staging folder."""
        from raysynth.storage import is_uri, staging_dir

        if is_uri(out):
            return cls(staging_dir(str(out)), remote=str(out))
        return cls(Path(out).expanduser().resolve())

    @property
    def location(self) -> str:
        """Where the output lives, for messages: the URI, or the local folder."""
        return self.remote or str(self.root)

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

    @property
    def subsets(self) -> Path:
        """Nested real-data subsets of every fold's training part, one per real fraction; a
        refinement of splits.json, written by the first stage that needs it (train or study)."""
        return self.prepared / "subsets.json"

    # train
    def ddpm(self, fold: int, fraction: float = 1.0) -> Path:
        return self.root / "ddpm" / f"fold_{fold}{fraction_tag(fraction)}"

    # sample
    def synthetic(self, fold: int, fraction: float = 1.0) -> Path:
        return self.root / "synthetic" / f"fold_{fold}{fraction_tag(fraction)}"

    @property
    def quality(self) -> Path:
        return self.root / "quality"

    @property
    def study(self) -> Path:
        return self.root / "study"

    def study_model(self, key: str) -> Path:
        """The trained downstream network of one study trial (``cv.trial_key``)."""
        return self.study / "models" / f"{key}.pt"

    @property
    def robustness(self) -> Path:
        return self.root / "robustness"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def ray_storage(self) -> Path:
        """Ray Train / Tune run folders (checkpoints, trial state)."""
        return self.root / "ray"


def fraction_tag(fraction: float) -> str:
    """Folder suffix of a real-data fraction: "" for the whole training part, "_p25" for 25%."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: {fraction} must lie in (0, 1]")
    if fraction == 1.0:
        return ""
    return "_p" + f"{fraction * 100:g}".replace(".", "_")


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
