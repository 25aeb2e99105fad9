"""Stage ``sample``: fan sample requests out to model-holding actors with Ray Data, write shards.

Every synthetic sample has a key ``(fold, class c, index j)`` and a seed derived from it, so
sample j of class c is the same whatever the size of the run: growing a set from N to M
samples generates only the M - N missing ones, and the first N are untouched.

A *request* is one shard of one generator: a contiguous range ``[lo, hi)`` of indices of one
class. Requests are rows of a Ray Dataset; :class:`ShardSampler` actors (each generator loaded
once per actor, on its first request) turn each into ``part-c{c}-{lo}-{hi}.parquet`` (plus one
``.nii.gz`` per sample in 3D), written atomically (temporary file, then rename), and return only
metadata, so the driver's memory stays flat however many samples are asked for. A rerun after a
crash finds the finished shards by name and asks only for the rest.

Every generator is sampled: one per fold, plus one per (fold, real fraction) of a scarcity
curve, each into its own folder (``layout.synthetic(fold, fraction)``), at the largest ratio the
study asks for (``study.ratios``); smaller ratios use the first samples of each class. All of
them go through ONE Ray Data pipeline, so the actors start once per stage rather than once per
generator (issue 9: an actor's start was the whole of the sampler's overhead); each generator's
manifest is written once all its shards exist.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq

from raysynth.config import Config, from_dict
from raysynth.errors import StageError
from raysynth.layout import Layout, fraction_tag, read_json, write_json
from raysynth.runtime import derive_seed, ensure_ray, set_threads

log = logging.getLogger(__name__)

SHARD_RE = re.compile(r"^part-c(?P<c>\d+)-(?P<lo>\d{7})-(?P<hi>\d{7})\.parquet$")


def shard_name(label: int, lo: int, hi: int) -> str:
    return f"part-c{label}-{lo:07d}-{hi:07d}.parquet"


def sample_id(fold: int, label: int, index: int, fraction: float = 1.0) -> str:
    return f"syn-f{fold}{fraction_tag(fraction)}-c{label}-{index:07d}"


def sample_seed(base: int, fold: int, label: int, index: int) -> int:
    # Deliberately independent of the real fraction: the generators of one fold start sample j
    # from the same noise, so sizes are compared with common random numbers.
    return derive_seed(base, fold, label, index) % 2**63


def class_counts(cfg: Config, real_counts: dict[int, int], num_samples: Optional[int],
                 ratio: Optional[float] = None) -> dict[int, int]:
    """How many synthetic samples each class gets.

    ``balanced``: every class gets ``ratio x`` the largest real class (or an equal share of
    ``num_samples``), which also rebalances a skewed real set. ``proportional``: each class gets
    ``ratio x`` its own real count (or its share of ``num_samples``). ``ratio`` defaults to
    ``sampling.ratio``.
    """
    from raysynth.study.design import synthetic_counts

    classes = sorted(real_counts)
    total = cfg.sampling.num_samples if num_samples is None else num_samples
    if total is None:
        return synthetic_counts(real_counts, cfg.sampling.ratio if ratio is None else ratio, cfg.sampling.class_balance)
    if cfg.sampling.class_balance == "balanced":
        base, extra = divmod(total, len(classes))
        return {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}
    n_real = sum(real_counts.values())
    exact = {c: total * real_counts[c] / n_real for c in classes}
    counts = {c: int(math.floor(v)) for c, v in exact.items()}
    for c in sorted(classes, key=lambda c: exact[c] - counts[c], reverse=True)[: total - sum(counts.values())]:
        counts[c] += 1
    return counts


def existing_shards(folder: Path) -> dict[int, list[tuple[int, int]]]:
    found: dict[int, list[tuple[int, int]]] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = SHARD_RE.match(p.name)
            if m:
                found.setdefault(int(m["c"]), []).append((int(m["lo"]), int(m["hi"])))
    return found


def plan_requests(counts: dict[int, int], existing: dict[int, list[tuple[int, int]]], shard_size: int) -> list[dict]:
    """Shards still to write: the indices ``[0, n_c)`` not covered by an existing shard, in
    ranges of at most ``shard_size`` aligned to multiples of it (so names are reproducible)."""
    requests = []
    for c, n in counts.items():
        covered = np.zeros(n, dtype=bool)
        for lo, hi in existing.get(c, []):
            covered[lo:min(hi, n)] = True
        j = 0
        while j < n:
            if covered[j]:
                j += 1
                continue
            end = min(n, (j // shard_size + 1) * shard_size)
            k = j
            while k < end and not covered[k]:
                k += 1
            requests.append({"label": c, "lo": j, "hi": k})
            j = k
    return requests


class ShardSampler:
    """A Ray Data actor: loads generators on demand (the last :attr:`CACHE` stay loaded) and writes whole shards.

    ``__call__`` takes a batch of requests (columns ``label``, ``lo``, ``hi``, and ``fold`` and
    ``fraction`` naming the generator) and returns one metadata row per shard written. Given a
    ``fold``, the constructor loads that generator at once and makes it current, for calls of
    :meth:`generate` and :meth:`write_shard` (and request rows) that name none.
    """

    CACHE = 3
    """Generators kept per actor. Requests arrive grouped by generator, so one would do; three leave
    room for the rows of neighbouring generators that the pool hands out at a boundary."""

    def __init__(self, cfg_dict: dict, root: str, fold: Optional[int] = None, cpus: float = 1,
                 fraction: float = 1.0) -> None:
        import torch

        set_threads(cpus)
        self.cfg = from_dict(cfg_dict)
        self.layout = Layout.at(root)
        self.device = "cuda" if torch.cuda.is_available() and self.cfg.sampling.gpus_per_actor > 0 else "cpu"
        # bf16 autocast: always on GPU, on CPU when asked (sampling.cpu_bf16; part of the sampling digest).
        self.bf16 = self.device == "cuda" or self.cfg.sampling.cpu_bf16
        self._loaded: OrderedDict[tuple[int, float], tuple[Any, Any, dict]] = OrderedDict()
        self.fold: Optional[int] = None
        if fold is not None:
            self.use(fold, fraction)

    def use(self, fold: int, fraction: float = 1.0) -> None:
        """Make the (fold, fraction) generator current, loading it unless it is among the cached ones."""
        import torch

        from raysynth.diffusion.train import load_generator

        key = (int(fold), float(fraction))
        if key not in self._loaded:
            model, process, meta = load_generator(self.layout, key[0], device=self.device, fraction=key[1])
            if self.device == "cuda":
                model = model.to(memory_format=torch.channels_last if self.cfg.data.dims == 2 else torch.contiguous_format)
            self._loaded[key] = (model, process, meta)
            while len(self._loaded) > self.CACHE:
                self._loaded.popitem(last=False)  # the least recently used; never the one just added
        self._loaded.move_to_end(key)
        self.fold, self.fraction = key
        self.model, self.process, self.meta = self._loaded[key]
        self.out = self.layout.synthetic(*key)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows: dict[str, list] = {"shard": [], "fold": [], "fraction": [], "label": [], "count": [], "seconds": []}
        for i, (label, lo, hi) in enumerate(zip(batch["label"], batch["lo"], batch["hi"])):
            t0 = time.time()
            if "fold" in batch:
                self.use(int(batch["fold"][i]), float(batch["fraction"][i]) if "fraction" in batch else 1.0)
            elif self.fold is None:
                raise ValueError("ShardSampler: a request without a 'fold' column needs a fold given to the constructor")
            name = self.write_shard(int(label), int(lo), int(hi))
            rows["shard"].append(name)
            rows["fold"].append(self.fold)
            rows["fraction"].append(self.fraction)
            rows["label"].append(int(label))
            rows["count"].append(int(hi - lo))
            rows["seconds"].append(time.time() - t0)
        return rows

    def generate(self, label: int, indices: list[int]):
        """Images ``(n, *S)`` in [-1, 1] and masks ``(n, *S)`` uint8 or None, one seed per sample."""
        import torch

        from raysynth.diffusion.channels import decode_joint

        s, cfg, meta = self.cfg.sampling, self.cfg, self.meta
        n_mask = int(meta["num_mask_classes"])
        channels = 1 + n_mask if n_mask else 1
        shape = (channels,) + (cfg.data.image_size,) * cfg.data.dims
        images, masks = [], []
        for start in range(0, len(indices), s.batch_size):
            chunk = indices[start:start + s.batch_size]
            gens = [torch.Generator(device=self.device).manual_seed(sample_seed(s.seed, self.fold, label, j)) for j in chunk]
            labels = torch.full((len(chunk),), label, dtype=torch.long, device=self.device)
            with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.bf16):
                x = self.process.sample(self.model, labels, shape, s.sampler, s.steps, gens)
            img, msk = decode_joint(x.float().cpu(), n_mask)
            images.append(img.numpy())
            if msk is not None:
                masks.append(msk.numpy())
        return np.concatenate(images), (np.concatenate(masks) if masks else None)

    def write_shard(self, label: int, lo: int, hi: int) -> str:
        from raysynth.data.schema import SYNTHETIC_SCHEMA, ImageSet, checksum, write_parquet

        indices = list(range(lo, hi))
        images, masks = self.generate(label, indices)
        ids = [sample_id(self.fold, label, j, self.fraction) for j in indices]
        spacing = tuple(self.meta.get("spacing") or (1.0,) * self.cfg.data.dims)
        paths: list[Optional[str]] = [None] * len(ids)
        if self.cfg.data.dims == 3 and self.cfg.sampling.write_nifti:
            from raysynth.data.nifti import write_volume  # nibabel: only 3D output needs it

            for i, sid in enumerate(ids):
                write_volume(self.out / "nifti" / f"{sid}.nii.gz", images[i], spacing)
                paths[i] = f"nifti/{sid}.nii.gz"
                if masks is not None:
                    write_volume(self.out / "nifti" / f"{sid}_seg.nii.gz", masks[i], spacing, is_mask=True)
        s = self.cfg.sampling
        data = ImageSet(
            ids=ids, subjects=["synthetic"] * len(ids), labels=np.full(len(ids), label, dtype=np.int64),
            images=images.astype(np.float32), masks=masks, spacing=spacing,
            extra={
                "fold": [self.fold] * len(ids),
                "generator_id": [self.meta["generator_id"]] * len(ids),
                "seed": [sample_seed(s.seed, self.fold, label, j) for j in indices],
                "sampler": [s.sampler] * len(ids),
                "steps": [s.steps] * len(ids),
                "checksum": [checksum(images[i], None if masks is None else masks[i]) for i in range(len(ids))],
                "path": paths,
            },
        )
        name = shard_name(label, lo, hi)
        write_parquet(data, self.out / name, schema=SYNTHETIC_SCHEMA)  # atomic: tmp + rename
        return name


def sample_synthetic(
    cfg: Config, layout: Layout, folds: Optional[list[int]] = None, num_samples: Optional[int] = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Sample every requested fold's synthetic sets (only what is missing). Returns the manifests.

    Each (fold, fraction) generator gets ``n_c`` samples per class for the largest study ratio,
    counted against the real training set the study pairs them with (the fold's training part,
    or the fraction's subset of it), unless ``num_samples`` fixes the total.
    """
    from raysynth.data.prepare import load_prepared
    from raysynth.study.design import generator_fractions, largest_ratio, scarcity_subsets

    records, fingerprint, splits = load_prepared(layout)
    wanted = [f["fold"] for f in splits] if folds is None else folds
    labels_by_id = dict(zip(records.ids, records.labels.tolist()))
    subsets = scarcity_subsets(cfg, layout, splits, labels_by_id, dict(zip(records.ids, records.subjects)))
    manifests: list[Optional[dict[str, Any]]] = []
    pending: list[tuple[int, int, float, dict, dict[int, int]]] = []  # (slot in manifests, fold, fraction, meta, counts)
    requests: list[dict] = []
    for k in wanted:
        for p in generator_fractions(cfg):
            name = f"{k}{fraction_tag(p)}"
            meta_path = layout.ddpm(k, p) / "config.json"
            if not meta_path.is_file():
                raise StageError(f"sample: fold {name} has no trained generator at {layout.ddpm(k, p)}; "
                                 "run `raysynth train` first")
            meta = read_json(meta_path)
            out = layout.synthetic(k, p)
            manifest_path = out / "manifest.json"
            old = read_json(manifest_path) if manifest_path.is_file() else None
            stale = old is not None and (old.get("generator_id") != meta["generator_id"]
                                         or old.get("sampling_digest") != _sampling_digest(cfg))
            if force or stale:
                if stale:
                    log.info("sample: fold %s: generator or sampling config changed, regenerating", name)
                import shutil

                shutil.rmtree(out, ignore_errors=True)
            real_counts = {c: 0 for c in range(int(fingerprint["num_classes"]))}
            for rid in subsets[k][p]:
                real_counts[labels_by_id[rid]] += 1
            counts = class_counts(cfg, real_counts, num_samples, ratio=largest_ratio(cfg))
            todo = plan_requests(counts, existing_shards(out), cfg.sampling.shard_size)
            named_counts = {fingerprint["class_names"][c]: n for c, n in counts.items()}
            if not todo and old is not None and not stale and not force and old.get("counts") == named_counts:
                log.info("sample: fold %s is up to date (%d samples)", name, sum(counts.values()))
                manifests.append(old)
                continue
            requests += [{**r, "fold": k, "fraction": p} for r in todo]
            pending.append((len(manifests), k, p, meta, counts))
            manifests.append(None)
    if requests:
        _run_requests(cfg, layout, requests)
    # Only once every shard exists: a manifest lists a complete set, and a crash before this leaves
    # none to mislead a rerun, which plans from the shard files alone.
    for slot, k, p, meta, counts in pending:
        manifests[slot] = _write_manifest(cfg, layout, k, meta, counts, fingerprint, p)
    return manifests  # type: ignore[return-value]  # every slot is filled


def _sampling_digest(cfg: Config) -> str:
    # Size fields are excluded on purpose: changing the count grows or shrinks the set in place.
    # cpu_bf16 changes the samples, so it counts (only when set: see Config.section_digest).
    s = cfg.sampling
    kept = type(s)(sampler=s.sampler, steps=s.steps, seed=s.seed, cpu_bf16=s.cpu_bf16)
    return Config(sampling=kept).section_digest("sampling")


def _run_requests(cfg: Config, layout: Layout, requests: list[dict]) -> None:
    """Write the shards of ``requests`` (rows: ``fold``, ``fraction``, ``label``, ``lo``, ``hi``;
    grouped by generator) with one Ray Data pipeline for all their generators."""
    import ray

    ensure_ray(cfg)
    s = cfg.sampling
    totals: dict[str, int] = {}
    for r in requests:
        name = f"{r['fold']}{fraction_tag(r['fraction'])}"
        totals[name] = totals.get(name, 0) + r["hi"] - r["lo"]
        layout.synthetic(r["fold"], r["fraction"]).mkdir(parents=True, exist_ok=True)
    for name, n in totals.items():
        log.info("sample: fold %s: %d samples to write", name, n)
    total = sum(totals.values())
    log.info("sample: %d samples in %d shards from %d generator(s) (%s, %d steps%s), %d-%d actors",
             total, len(requests), len(totals), s.sampler, s.steps, ", CPU bf16" if s.cpu_bf16 else "",
             s.min_actors, s.max_actors)
    ds = ray.data.from_items(requests, override_num_blocks=len(requests)).map_batches(
        ShardSampler,
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "root": str(layout.root), "cpus": s.cpus_per_actor},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=s.min_actors, max_size=s.max_actors),
        num_cpus=s.cpus_per_actor,
        num_gpus=s.gpus_per_actor,
    )
    done = dict.fromkeys(totals, 0)
    t0 = time.time()
    for row in ds.iter_rows():
        name = f"{int(row['fold'])}{fraction_tag(float(row['fraction']))}"
        done[name] += int(row["count"])
        rate = sum(done.values()) / max(time.time() - t0, 1e-9)
        log.info("sample: fold %s: %d/%d samples (all generators: %d/%d, %.1f/s), wrote %s",
                 name, done[name], totals[name], sum(done.values()), total, rate, row["shard"])


def _write_manifest(cfg: Config, layout: Layout, fold: int, meta: dict, counts: dict[int, int], fingerprint: dict,
                    fraction: float = 1.0) -> dict:
    """List the shards that make up the requested set, with per-sample checksums read back."""
    out = layout.synthetic(fold, fraction)
    shards = []
    for c, ranges in sorted(existing_shards(out).items()):
        for lo, hi in sorted(ranges):
            if c in counts and lo < counts[c]:
                shards.append((c, lo, hi))
    samples = []
    for c, lo, hi in shards:
        t = pq.read_table(out / shard_name(c, lo, hi), columns=["id", "label", "seed", "checksum", "path"])
        for row in t.to_pylist():
            j = int(row["id"].rsplit("-", 1)[1])
            if j < counts[c]:
                samples.append({**row, "shard": shard_name(c, lo, hi)})
    manifest = {
        "fold": fold,
        "fraction": fraction,
        "generator_id": meta["generator_id"],
        "config_digest": cfg.digest(),
        "sampling_digest": _sampling_digest(cfg),
        "process": meta["process"],
        "sampler": cfg.sampling.sampler,
        "steps": cfg.sampling.steps,
        "base_seed": cfg.sampling.seed,
        "cpu_bf16": cfg.sampling.cpu_bf16,
        "counts": {fingerprint["class_names"][c]: n for c, n in counts.items()},
        "num_samples": len(samples),
        "shards": sorted({s["shard"] for s in samples}),
        "samples": samples,
    }
    write_json(out / "manifest.json", manifest)
    _write_grids(cfg, layout, fold, fingerprint, fraction)
    return manifest


def _write_grids(cfg: Config, layout: Layout, fold: int, fingerprint: dict, fraction: float = 1.0) -> None:
    from raysynth.data.schema import read_parquet
    from raysynth.study.figures import save_grid

    out = layout.synthetic(fold, fraction)
    parts = sorted(out.glob("part-*.parquet"))
    if not parts:
        return
    for c, name in enumerate(fingerprint["class_names"]):
        mine = [p for p in parts if SHARD_RE.match(p.name) and int(SHARD_RE.match(p.name)["c"]) == c]
        if mine:
            data = read_parquet(mine[:1])
            save_grid(out / f"grid_{_safe(name)}.png", data.images[:16], data.masks[:16] if data.masks is not None else None,
                      title=f"synthetic '{name}', fold {fold}{fraction_tag(fraction)}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def read_synthetic(layout: Layout, fold: int, exclude: Optional[set[str]] = None, fraction: float = 1.0):
    """The (fold, fraction)'s synthetic set as listed in its manifest (an ImageSet), minus ``exclude`` ids."""
    from raysynth.data.schema import read_parquet

    folder = layout.synthetic(fold, fraction)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise StageError(f"no synthetic data for fold {fold} at {folder}; run `raysynth sample` first")
    manifest = read_json(manifest_path)
    if not manifest["shards"]:
        return None
    data = read_parquet([folder / s for s in manifest["shards"]])
    wanted = {s["id"] for s in manifest["samples"]} - (exclude or set())
    keep = [i for i, sid in enumerate(data.ids) if sid in wanted]
    return data.select(keep) if keep else None
