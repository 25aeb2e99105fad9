"""The sampling actor: loads generators once and writes whole shards of synthetic samples.

Used by the ``sample`` stage through Ray Data's ``map_batches(ShardSampler, compute=ActorPoolStrategy(...))``.
Every sample has a key ``(fold, class c, index j)`` and a seed derived from it (:func:`sample_seed`),
so sample j of class c is the same whatever the size of the run. Imports library modules only:
this runs in actors.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch

from raysynth.artifacts import Layout, sample_id, shard_name
from raysynth.config import from_dict
from raysynth.data.schema import SYNTHETIC_SCHEMA, ImageSet, checksum, write_parquet
from raysynth.diffusion.channels import decode_joint
from raysynth.diffusion.autoencoder import decode
from raysynth.diffusion.checkpoint import load_decoder, load_generator
from raysynth.runtime import derive_seed, set_threads, use_cpu_bf16


def sample_seed(base: int, fold: int, label: int, index: int) -> int:
    # Deliberately independent of the real fraction: the generators of one fold start sample j
    # from the same noise, so sizes are compared with common random numbers.
    return derive_seed(base, fold, label, index) % 2**63


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
        set_threads(cpus)
        self.cfg = from_dict(cfg_dict)
        self.layout = Layout.at(root)
        self.device = "cuda" if torch.cuda.is_available() and self.cfg.sampling.gpus_per_actor > 0 else "cpu"
        # bf16 autocast: always on GPU, on CPU when asked (sampling.cpu_bf16; part of the sampling digest).
        self.bf16 = self.device == "cuda" or use_cpu_bf16(self.cfg.sampling.cpu_bf16)
        self._loaded: OrderedDict[tuple[int, float], tuple[Any, Any, dict, Any]] = OrderedDict()
        self.fold: Optional[int] = None
        if fold is not None:
            self.use(fold, fraction)

    def use(self, fold: int, fraction: float = 1.0) -> None:
        """Make the (fold, fraction) generator current, loading it unless it is among the cached ones."""
        key = (int(fold), float(fraction))
        if key not in self._loaded:
            model, process, meta = load_generator(self.layout, key[0], device=self.device, fraction=key[1])
            if self.device == "cuda":
                model = model.to(memory_format=torch.channels_last if self.cfg.data.dims == 2 else torch.contiguous_format)
            self._loaded[key] = (model, process, meta, load_decoder(self.layout, meta, device=self.device))
            while len(self._loaded) > self.CACHE:
                self._loaded.popitem(last=False)  # the least recently used; never the one just added
        self._loaded.move_to_end(key)
        self.fold, self.fraction = key
        self.model, self.process, self.meta, self.decoder = self._loaded[key]
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
        """Images ``(n, C, *S)`` in [-1, 1] and masks ``(n, *S)`` uint8 or None, one seed per sample.

        In latent space the process draws scaled latents ``(n, L, *S/f)``, which the fold's
        autoencoder decodes, a batch at a time, into the same joint tensor a pixel generator draws."""
        s, cfg, meta = self.cfg.sampling, self.cfg, self.meta
        n_mask = int(meta["num_mask_classes"])
        n_image = int(meta.get("num_channels", 1))  # generators trained before channels were explicit: grey
        channels = n_image + n_mask
        shape = (channels,) + (cfg.data.image_size,) * cfg.data.dims
        if self.decoder is not None:
            shape = tuple(meta["autoencoder"]["latent_shape"])
        images, masks = [], []
        for start in range(0, len(indices), s.batch_size):
            chunk = indices[start:start + s.batch_size]
            gens = [torch.Generator(device=self.device).manual_seed(sample_seed(s.seed, self.fold, label, j)) for j in chunk]
            labels = torch.full((len(chunk),), label, dtype=torch.long, device=self.device)
            with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.bf16):
                x = self.process.sample(self.model, labels, shape, s.sampler, s.steps, gens,
                                        guidance_scale=s.guidance_scale)
                if self.decoder is not None:
                    x = decode(self.decoder, x.float() / float(meta["autoencoder"]["scale_factor"]))
            img, msk = decode_joint(x.float().cpu(), n_mask, n_image)
            images.append(img.numpy())
            if msk is not None:
                masks.append(msk.numpy())
        return np.concatenate(images), (np.concatenate(masks) if masks else None)

    def write_shard(self, label: int, lo: int, hi: int) -> str:
        indices = list(range(lo, hi))
        images, masks = self.generate(label, indices)
        ids = [sample_id(self.fold, label, j, self.fraction) for j in indices]
        spacing = tuple(self.meta.get("spacing") or (1.0,) * self.cfg.data.dims)
        paths: list[Optional[str]] = [None] * len(ids)
        if self.cfg.data.dims == 3 and self.cfg.sampling.write_nifti:
            from raysynth.data.nifti import (
                write_volume,  # nibabel: only 3D output needs it
            )

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
