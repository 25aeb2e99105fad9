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
import re
import shutil
import time
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import ray

from raysynth.artifacts import (
    CURATION,
    MANIFEST,
    SHARD_RE,
    Layout,
    curation_digest,
    existing_shards,
    fraction_tag,
    generator_meta,
    read_manifest,
    read_prepared,
    read_subsets,
    sampling_digest,
    shard_name,
)
from raysynth.config import Config
from raysynth.console import Progress
from raysynth.data.schema import read_parquet
from raysynth.design import class_counts, generator_fractions, largest_ratio
from raysynth.diffusion.sampler import ShardSampler
from raysynth.downstream.curate import curate_generator
from raysynth.io import write_json
from raysynth.render.figures import save_grid
from raysynth.runtime import ensure_ray, use_cpu_bf16

log = logging.getLogger(__name__)

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


def sample_synthetic(
    cfg: Config, layout: Layout, folds: Optional[list[int]] = None, num_samples: Optional[int] = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Sample every requested fold's synthetic sets (only what is missing). Returns the manifests.

    Each (fold, fraction) generator gets ``n_c`` samples per class for the largest study ratio,
    counted against the real training set the study pairs them with (the fold's training part,
    or the fraction's subset of it), unless ``num_samples`` fixes the total.
    """
    records, fingerprint, splits = read_prepared(layout, cfg)
    wanted = [f["fold"] for f in splits] if folds is None else folds
    labels_by_id = dict(zip(records.ids, records.labels.tolist()))
    subsets = read_subsets(layout, cfg)
    manifests: list[Optional[dict[str, Any]]] = []
    pending: list[tuple[int, int, float, dict, dict[int, int]]] = []  # (slot in manifests, fold, fraction, meta, counts)
    requests: list[dict] = []
    # Curation drops samples, so it samples more than the study's largest ratio needs.
    oversample = cfg.sampling.curate.oversample if cfg.sampling.curate and num_samples is None else 1.0
    for k in wanted:
        for p in generator_fractions(cfg):
            name = f"{k}{fraction_tag(p)}"
            meta = generator_meta(layout, k, p, cfg)
            out = layout.synthetic(k, p)
            old = read_manifest(layout, k, p)  # checked here, against the generator and sampling config
            stale = old is not None and (old.get("generator_id") != meta["generator_id"]
                                         or old.get("sampling_digest") != sampling_digest(cfg))
            if force or stale:
                if stale:
                    log.info("sample: fold %s: generator or sampling config changed, regenerating", name)
                shutil.rmtree(out, ignore_errors=True)
            real_counts = {c: 0 for c in range(int(fingerprint["num_classes"]))}
            for rid in subsets[k][p]:
                real_counts[labels_by_id[rid]] += 1
            counts = class_counts(cfg, real_counts, num_samples, ratio=largest_ratio(cfg) * oversample)
            if not sum(counts.values()) and num_samples is None and cfg.sampling.num_samples is None:
                log.warning("sample: fold %s gets no synthetic sample: ratio %g x its real training counts %s "
                            "rounds to 0; raise sampling.ratio (study.ratios) or set sampling.num_samples", name,
                            largest_ratio(cfg) * oversample, real_counts)
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
    return _curate_sets(cfg, layout, manifests, fingerprint)  # type: ignore[arg-type]  # every slot is filled


def _curate_sets(cfg: Config, layout: Layout, manifests: list[dict[str, Any]], fingerprint: dict) -> list[dict[str, Any]]:
    """``sampling.curate``: score every set whose curation is missing or outdated, one Ray task per
    generator (its curator trains on that generator's real subset), write ``curation.json`` and a
    summary into the manifest. Without it, an earlier curation is removed."""
    if cfg.sampling.curate is None:
        for m in manifests:
            if m.get("curation"):
                (layout.synthetic(m["fold"], m["fraction"]) / CURATION).unlink(missing_ok=True)
                m.pop("curation")
                write_json(layout.synthetic(m["fold"], m["fraction"]) / MANIFEST, m)
        return manifests
    todo = [m for m in manifests
            if not (layout.synthetic(m["fold"], m["fraction"]) / CURATION).is_file()
            or (m.get("curation") or {}).get("digest") != curation_digest(cfg, m)]
    if not todo:
        return manifests
    ensure_ray(cfg)
    st = cfg.study
    task = ray.remote(curate_generator).options(num_cpus=st.cpus_per_trial, num_gpus=st.gpus_per_trial, max_retries=1)
    refs = {task.remote(cfg.to_dict(), str(layout.root), m["fold"], m["fraction"]): m for m in todo}
    names = fingerprint["class_names"]
    with Progress("curate", len(refs), "sets") as bar:
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            m = refs.pop(ready[0])
            record = ray.get(ready[0])
            out = layout.synthetic(m["fold"], m["fraction"])
            write_json(out / CURATION, record)
            m["curation"] = {
                "digest": record["digest"], "threshold": record["threshold"], "score": record.get("score"),
                "epochs": record["epochs"], "num_trained_on": len(record["trained_on"]),
                "num_scored": record["num_scored"], "num_kept": record["num_kept"],
                "kept": {names[int(c)]: v["kept"] for c, v in record["per_class"].items()},
                "score_quantiles": record.get("score_quantiles", {}),
            }
            write_json(out / MANIFEST, m)
            log.info("sample: curated fold %d%s: kept %d of %d (threshold %.2f)", m["fold"], fraction_tag(m["fraction"]),
                     record["num_kept"], record["num_scored"], record["threshold"])
            bar.update()
    return manifests


def _run_requests(cfg: Config, layout: Layout, requests: list[dict]) -> None:
    """Write the shards of ``requests`` (rows: ``fold``, ``fraction``, ``label``, ``lo``, ``hi``;
    grouped by generator) with one Ray Data pipeline for all their generators."""
    ensure_ray(cfg)
    s = cfg.sampling
    totals: dict[str, int] = {}
    for r in requests:
        name = f"{r['fold']}{fraction_tag(r['fraction'])}"
        totals[name] = totals.get(name, 0) + r["hi"] - r["lo"]
        layout.synthetic(r["fold"], r["fraction"]).mkdir(parents=True, exist_ok=True)
    for name, n in totals.items():
        log.debug("sample: fold %s: %d samples to write", name, n)
    total = sum(totals.values())
    log.info("sample: %d samples in %d shards from %d generator(s) (%s, %d steps%s), %d-%d actors",
             total, len(requests), len(totals), s.sampler, s.steps, ", CPU bf16" if use_cpu_bf16(s.cpu_bf16) else "",
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
    with Progress("sample", total, "samples") as bar:
        for row in ds.iter_rows():
            name = f"{int(row['fold'])}{fraction_tag(float(row['fraction']))}"
            done[name] += int(row["count"])
            bar.note(", ".join(f"fold {k} {n}/{totals[k]}" for k, n in done.items()))
            bar.update(int(row["count"]))
            rate = sum(done.values()) / max(time.time() - t0, 1e-9)
            log.debug("sample: fold %s: %d/%d samples (all generators: %d/%d, %.1f/s), wrote %s",
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
        "sampling_digest": sampling_digest(cfg),
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
    write_json(out / MANIFEST, manifest)
    _write_grids(cfg, layout, fold, fingerprint, fraction)
    return manifest


def _write_grids(cfg: Config, layout: Layout, fold: int, fingerprint: dict, fraction: float = 1.0) -> None:
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
