"""Feature encoders for fidelity metrics, trained here because no hub weights may be downloaded.

Inception features (FID) are unavailable offline and were never meant for MRI anyway. Two
encoders are offered instead, both a small CNN (2D or 3D through ``spatial_dims``, MONAI style):

* ``trained`` (the default): fitted on the fold's real training images only, as a classifier
  with cross-entropy; features are the penultimate layer (a linear projection of the globally
  pooled last conv block, before the class head), as Inception's pool features are for FID. If
  the training part holds a single class (e.g. a segmentation cohort), there is nothing to
  classify, so it is fitted as a denoising autoencoder instead and the bottleneck is the feature.
* ``random``: the same network with a fixed seeded initialisation and no training. Random CNN
  features still separate distributions of images (they are a fixed, rich random projection), and
  their numbers are reproducible across runs and sites.

``Encoder.description`` records which was used, how it was trained and its training accuracy.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CHANNELS = (16, 32, 64)
DENOISING_SIGMA = 0.2  # noise std on the [-1, 1] intensity scale for the autoencoder objective


class EncoderNet(nn.Module):
    """Conv blocks that halve the size, global average pooling, a linear feature layer, heads.

    Shapes: input ``(B, C, *spatial)`` with ``in_channels`` C; :meth:`embed` returns ``(B, feature_dim)``.
    """

    def __init__(self, spatial_dims: int, feature_dim: int, num_classes: int = 0,
                 channels: Sequence[int] = CHANNELS, decoder: bool = False, in_channels: int = 1) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: {spatial_dims} must be 2 or 3")
        if feature_dim < 1:
            raise ValueError(f"feature_dim: {feature_dim} must be >= 1")
        if num_classes < 0:
            raise ValueError(f"num_classes: {num_classes} must be >= 0")
        if in_channels < 1:
            raise ValueError(f"in_channels: {in_channels} must be >= 1")
        self.in_channels = int(in_channels)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.spatial_dims = spatial_dims
        blocks: list[nn.Module] = []
        c_in = self.in_channels
        for c in channels:
            # GroupNorm, not BatchNorm: features must not depend on batch composition at inference.
            blocks += [conv(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       conv(c, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.trunk = nn.Sequential(*blocks)
        self.project = nn.Linear(c_in, feature_dim)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, num_classes)) if num_classes else None
        self.channels = tuple(channels)
        if decoder:
            self.seed_shape = (c_in,) + (4,) * spatial_dims
            self.expand = nn.Linear(feature_dim, int(np.prod(self.seed_shape)))
            ups: list[nn.Module] = []
            for c in reversed(channels[:-1]):
                ups += [nn.Upsample(scale_factor=2, mode="nearest"), conv(c_in, c, 3, padding=1), nn.SiLU()]
                c_in = c
            self.up = nn.Sequential(*ups)
            self.out = conv(c_in, self.in_channels, 3, padding=1)
        else:
            self.expand = None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return self.project(h.flatten(2).mean(-1))

    def decode(self, z: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.expand is None:
            raise RuntimeError("decode: this network was built without a decoder")
        h = self.up(self.expand(z).view(-1, *self.seed_shape))
        # The bottleneck is a fixed 4^d grid, so resample to whatever the input size was.
        h = F.interpolate(h, size=tuple(size), mode="bilinear" if self.spatial_dims == 2 else "trilinear")
        return self.out(h)


class Encoder:
    """A frozen feature extractor with a record of how it was made.

    Args:
        net: the network; only :meth:`EncoderNet.embed` is used for features.
        description: JSON-ready provenance (``kind``, ``objective``, ``train_accuracy``, ...).
    """

    def __init__(self, net: EncoderNet, description: dict[str, Any]) -> None:
        self.net = net.eval()
        self.description = dict(description)

    @property
    def kind(self) -> str:
        return self.description["kind"]

    def _batches(self, images: np.ndarray, batch_size: int):
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != self.net.spatial_dims + 2 or images.shape[1] != self.net.in_channels:
            raise ValueError(f"images: expected (N, {self.net.in_channels}, *spatial) with {self.net.spatial_dims} "
                             f"spatial dims, got shape {images.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be >= 1")
        for start in range(0, len(images), batch_size):
            yield torch.from_numpy(images[start : start + batch_size])

    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """``images (N, C, *spatial)`` in [-1, 1] -> features ``(N, feature_dim)`` float64."""
        with torch.inference_mode():
            out = [self.net.embed(x).double().numpy() for x in self._batches(images, batch_size)]
        dim = self.net.project.out_features
        return np.concatenate(out) if out else np.zeros((0, dim))

    def accuracy(self, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> Optional[float]:
        """Classification accuracy on ``(images, labels)``; None for an encoder without a class head."""
        if self.net.head is None or len(images) == 0:
            return None
        with torch.inference_mode():
            pred = np.concatenate([self.net.head(self.net.embed(x)).argmax(1).numpy()
                                   for x in self._batches(images, batch_size)])
        return float(np.mean(pred == np.asarray(labels)))


def _build(dims: int, feature_dim: int, seed: int, **kwargs: Any) -> EncoderNet:
    # Seed the initialisation without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EncoderNet(dims, feature_dim, **kwargs)


def random_encoder(dims: int, feature_dim: int, seed: int, reason: str = "configured", in_channels: int = 1) -> Encoder:
    """A fixed, seeded, untrained CNN of ``in_channels`` input channels: reproducible features with
    no training data involved."""
    net = _build(dims, feature_dim, seed, in_channels=in_channels)
    return Encoder(net, {"kind": "random", "reason": reason, "objective": None, "feature_dim": feature_dim,
                         "in_channels": int(in_channels),
                         "channels": list(net.channels), "seed": seed, "epochs": 0, "train_accuracy": None})


def train_encoder(images: np.ndarray, labels: np.ndarray, dims: int, feature_dim: int, epochs: int, seed: int,
                  batch_size: int = 32, learning_rate: float = 1e-3) -> Encoder:
    """Fit the encoder on real training images; a classifier, or a denoiser when there is one class.

    Args:
        images: ``(N, C, *spatial)`` real training images in [-1, 1] (the encoder reads C channels);
            labels: ``(N,)`` class indices.
        dims: 2 or 3 spatial dims; feature_dim: the feature width F.
        epochs: passes over the data; seed: seeds initialisation, shuffling and noise.

    Returns:
        An :class:`Encoder` whose description has ``kind="trained"``, ``objective`` and
        ``train_accuracy`` (classifier) or ``train_loss`` (denoiser). With fewer than 2 images it
        falls back to :func:`random_encoder` and records why.
    """
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != dims + 2:
        raise ValueError(f"images: expected (N, C, *spatial) with dims={dims}, got shape {images.shape}")
    in_channels = int(images.shape[1])
    if labels.shape != (len(images),):
        raise ValueError(f"labels: expected shape ({len(images)},), got {labels.shape}")
    if epochs < 1:
        raise ValueError(f"epochs: {epochs} must be >= 1")
    if len(images) < 2:
        return random_encoder(dims, feature_dim, seed, reason=f"only {len(images)} training image(s)",
                              in_channels=in_channels)
    classes = np.unique(labels)
    classify = len(classes) >= 2
    num_classes = int(labels.max()) + 1 if classify else 0
    net = _build(dims, feature_dim, seed, num_classes=num_classes, decoder=not classify, in_channels=in_channels)
    optimiser = torch.optim.Adam(net.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    net.train()
    last = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for start in range(0, len(order), batch_size):
            b = order[start : start + batch_size]
            x = x_all[b]
            if classify:
                loss = F.cross_entropy(net.head(net.embed(x)), y_all[b])
            else:
                noisy = x + DENOISING_SIGMA * torch.randn(x.shape, generator=gen)
                loss = F.mse_loss(net.decode(net.embed(noisy), x.shape[2:]), x)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(b)
        last = total / len(x_all)
        logger.debug("encoder epoch %d/%d: loss %.4f", epoch + 1, epochs, last)
    description = {"kind": "trained", "reason": "configured",
                   "objective": "cross_entropy" if classify else "denoising_autoencoder",
                   "feature_dim": feature_dim, "channels": list(net.channels), "in_channels": in_channels,
                   "seed": seed, "epochs": epochs,
                   "num_train": int(len(images)), "classes_seen": [int(c) for c in classes],
                   "train_loss": last, "train_accuracy": None}
    if not classify:
        description["reason"] = "one class in the training data: fitted as a denoising autoencoder"
    encoder = Encoder(net, description)
    encoder.description["train_accuracy"] = encoder.accuracy(images, labels)
    return encoder


__all__ = ["Encoder", "EncoderNet", "train_encoder", "random_encoder"]
