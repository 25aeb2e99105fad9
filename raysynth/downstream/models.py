"""Downstream CNNs (2D and 3D through ``dims``) and one train-then-evaluate function per trial.

``fit_and_evaluate`` is the unit the study's Ray Tune grid runs once per arm x fold x seed: the
baseline and augmented arms of a cell call it with the same test fold, seed and settings and
differ only in ``train``. It is deterministic on CPU for a given seed and leaves the caller's
torch RNG state and thread count untouched.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.blocks import Convolution
from monai.networks.layers import Pool
from monai.networks.nets import UNet
from torch import nn

from raysynth.data.schema import ImageSet
from raysynth.downstream.metrics import classification_metrics, segmentation_metrics
from raysynth.io import atomic_path

TASKS = ("classification", "segmentation")
NORMS = ("batch", "instance")


def _check_network_args(dims: int, in_channels: int, num_classes: int, width: int) -> None:
    if dims not in (2, 3):
        raise ValueError(f"dims: {dims} is not supported; choose 2 or 3")
    if in_channels < 1:
        raise ValueError(f"in_channels: {in_channels} must be >= 1")
    if num_classes < 2:
        raise ValueError(f"num_classes: {num_classes} must be >= 2")
    if width < 1:
        raise ValueError(f"width: {width} must be >= 1")


def build_classifier(
    dims: int, in_channels: int, num_classes: int, width: int, *, norm: str = "batch", dropout: float = 0.2
) -> nn.Module:
    """A small VGG-style CNN: ``(B, C, *S)`` -> logits ``(B, num_classes)``.

    A stem conv at full resolution, then three stages of (stride-2 conv, conv) with widths
    ``width * (1, 2, 4)``, each conv followed by ``norm`` and ReLU; global average pooling makes
    it independent of the input size (>= 8 per axis), then dropout and a linear head.
    """
    _check_network_args(dims, in_channels, num_classes, width)
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not known; choose one of {list(NORMS)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: {dropout} must lie in [0, 1)")

    def conv(cin: int, cout: int, stride: int) -> nn.Module:
        return Convolution(dims, cin, cout, strides=stride, kernel_size=3, act="RELU", norm=norm.upper())

    layers: list[nn.Module] = [conv(in_channels, width, 1)]
    cin = width
    for mult in (1, 2, 4):
        layers += [conv(cin, width * mult, 2), conv(width * mult, width * mult, 1)]
        cin = width * mult
    layers += [Pool[Pool.ADAPTIVEAVG, dims](1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def build_segmenter(dims: int, in_channels: int, num_classes: int, width: int) -> nn.Module:
    """MONAI UNet, ``(B, C, *S)`` -> logits ``(B, num_classes, *S)``; ``S`` divisible by 4."""
    _check_network_args(dims, in_channels, num_classes, width)
    return UNet(
        spatial_dims=dims, in_channels=in_channels, out_channels=num_classes,
        channels=(width, 2 * width, 4 * width), strides=(2, 2), num_res_units=1,
    )


@dataclass(frozen=True)
class NetworkSpec:
    """What rebuilds a trained downstream network: its task, dims, number of outputs, width and
    input channels."""

    task: str
    dims: int
    num_outputs: int
    """Classification: classes. Segmentation: mask classes, background included."""
    width: int
    in_channels: int = 1
    """Image channels (sequences) the network reads."""

    def build(self) -> nn.Module:
        if self.task == "segmentation":
            return build_segmenter(self.dims, self.in_channels, self.num_outputs, self.width)
        return build_classifier(self.dims, self.in_channels, self.num_outputs, self.width)


def save_network(model: nn.Module, spec: NetworkSpec, path: str | Path) -> None:
    """Write ``{"spec", "state_dict"}`` atomically (temporary file, then rename)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"spec": asdict(spec), "state_dict": state}, tmp)


def load_network(path: str | Path, device: str = "cpu") -> tuple[nn.Module, NetworkSpec]:
    """The network written by :func:`save_network`, in eval mode on ``device``."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    spec = NetworkSpec(**blob["spec"])
    model = spec.build()
    model.load_state_dict(blob["state_dict"])
    return model.to(torch.device(device)).eval(), spec


def predict(model: nn.Module, task: str, images: np.ndarray, *, batch_size: int, device: str = "cpu") -> np.ndarray:
    """Batched inference on ``images`` ``(N, C, *S)`` in [-1, 1]: classification gives ``(N, K)``
    softmax probabilities (float64), segmentation ``(N, *S)`` argmax label maps (uint8)."""
    dev = torch.device(device)
    model.eval()
    # np.require copies only what is not already a writable float32 C array (Ray hands out read-only ones).
    x = torch.from_numpy(np.require(images, np.float32, ["C", "W"]))
    seg = task == "segmentation"
    outputs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size].to(dev))
            outputs.append((logits.argmax(1).to(torch.uint8) if seg else logits.float().softmax(1)).cpu())
    out = torch.cat(outputs).numpy()
    return out if seg else out.astype(np.float64)


def evaluate(model: nn.Module, task: str, test: ImageSet, *, num_classes: int, num_mask_classes: Optional[int],
             batch_size: int, device: str = "cpu", class_names: Optional[list[str]] = None,
             mask_class_names: Optional[list[str]] = None, images: Optional[np.ndarray] = None) -> dict:
    """Score ``model`` on ``test``: ``{"metrics", "y_true", "y_prob", "per_sample_dice"}`` (see
    :class:`TrainResult`). ``images`` replaces ``test.images`` (a corrupted copy, same shape)
    while the labels and masks stay those of ``test``."""
    x = test.images if images is None else images
    if x.shape != test.images.shape:
        raise ValueError(f"images: shape {x.shape} differs from the test set's {test.images.shape}")
    out = predict(model, task, x, batch_size=batch_size, device=device)
    if task == "segmentation":
        metrics = segmentation_metrics(out, test.masks, num_mask_classes, mask_class_names, spacing=test.spacing)
        return {"metrics": metrics, "y_true": [], "y_prob": None, "per_sample_dice": metrics["per_sample_dice"]}
    names = class_names or [str(c) for c in range(num_classes)]
    metrics = classification_metrics(test.labels.astype(np.int64), out, names)
    return {"metrics": metrics, "y_true": test.labels.astype(int).tolist(), "y_prob": out.tolist(),
            "per_sample_dice": None}


@dataclass
class TrainResult:
    """One trial's outcome. ``to_dict`` is what ``fit_and_evaluate`` returns (JSON-safe)."""

    task: str
    metrics: dict
    y_true: list
    """Classification: test labels ``(N,)``. Segmentation: empty (the masks are not copied)."""
    y_prob: Optional[list]
    """Classification: ``(N, K)`` softmax probabilities. Segmentation: None."""
    per_sample_dice: Optional[list]
    """Segmentation: ``(N,)`` mean foreground Dice per test image. Classification: None."""
    test_ids: list
    train_size: int
    test_size: int
    epochs: int
    train_seconds: float
    eval_seconds: float
    loss_history: list = field(default_factory=list)
    """Mean training loss of each epoch."""

    def to_dict(self) -> dict:
        return asdict(self)


def _validate(task, train, test, num_classes, num_mask_classes, epochs, batch_size, learning_rate, width) -> None:
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not known; choose one of {list(TASKS)}")
    if len(train) < 2:
        raise ValueError(f"train: {len(train)} records; at least 2 are needed")
    if len(test) < 1:
        raise ValueError("test: no records")
    if train.dims not in (2, 3):
        raise ValueError(f"train: images of shape {train.images.shape} are neither 2D nor 3D")
    if train.record_shape != test.record_shape:
        raise ValueError(f"test: shape {test.record_shape} (channels first) differs from train {train.record_shape}")
    if min(train.spatial_shape) < 8:
        raise ValueError(f"train: spatial shape {train.spatial_shape} is below 8 on some axis")
    if epochs < 1:
        raise ValueError(f"epochs: {epochs} must be >= 1")
    if batch_size < 2:
        raise ValueError(f"batch_size: {batch_size} must be >= 2 (batch norm)")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate: {learning_rate} must be > 0")
    if width < 1:
        raise ValueError(f"width: {width} must be >= 1")
    if task == "classification":
        if num_classes < 2:
            raise ValueError(f"num_classes: {num_classes} must be >= 2")
        for name, s in (("train", train), ("test", test)):
            if s.labels.min() < 0 or s.labels.max() >= num_classes:
                raise ValueError(f"{name}: labels {sorted(set(s.labels.tolist()))} outside [0, {num_classes - 1}]")
    else:
        if num_mask_classes is None or num_mask_classes < 2:
            raise ValueError(f"num_mask_classes: {num_mask_classes} must be >= 2 for segmentation")
        for name, s in (("train", train), ("test", test)):
            if s.masks is None:
                raise ValueError(f"{name}: segmentation needs masks, this ImageSet has none")
            if s.masks.max() >= num_mask_classes:
                raise ValueError(f"{name}: mask label {int(s.masks.max())} >= num_mask_classes ({num_mask_classes})")
        if any(s % 4 for s in train.spatial_shape):
            raise ValueError(f"train: spatial shape {train.spatial_shape} must be divisible by 4 (UNet strides 2, 2)")


def fit_and_evaluate(
    task: str,
    train: ImageSet,
    test: ImageSet,
    *,
    num_classes: int,
    num_mask_classes: Optional[int],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    width: int,
    seed: int,
    device: str = "cpu",
    augment: Optional[Callable] = None,
    progress: Optional[Callable[[dict], None]] = None,
    class_names: Optional[list[str]] = None,
    mask_class_names: Optional[list[str]] = None,
    weight_decay: float = 1e-4,
    save_to: Optional[str | Path] = None,
    pretrain: Optional[ImageSet] = None,
) -> dict:
    """Train a fresh network on ``train`` and score it on ``test``; returns ``TrainResult.to_dict()``.

    Inputs: ``ImageSet.images`` ``(N, C, *S)`` float32 in [-1, 1] (the network reads C channels);
    classification uses ``labels`` ``(N,)`` and ``num_classes``; segmentation uses ``masks``
    ``(N, *S)`` and ``num_mask_classes`` (including background). AdamW with a per-step cosine
    schedule; cross-entropy (classification) or MONAI DiceCELoss (segmentation).

    ``augment(images (B, C, *S), masks (B, *S) | None) -> (images, masks)`` is applied to every
    training batch on the CPU (see ``augment.build_classical_augment``). ``progress`` receives
    ``{"epoch", "epochs", "train_loss", "lr", "seconds"}`` after each epoch. ``save_to``: also
    write the trained network there (:func:`save_network`), for evaluation without retraining.
    ``pretrain``: first train on this set (the synthetic_pretrain arm: synthetic samples) for the
    same epochs and schedule, then fine-tune on ``train`` with a fresh optimiser and schedule.
    Returned keys: see :class:`TrainResult`; ``metrics`` comes from ``metrics.py``.
    """
    _validate(task, train, test, num_classes, num_mask_classes, epochs, batch_size, learning_rate, width)
    dev = torch.device(device)
    # fork_rng restores the caller's RNG state afterwards; the seed alone fixes init and dropout.
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        start = time.perf_counter()
        model, spec, history, pretrain_history = _fit(
            task, train, num_classes=num_classes, num_mask_classes=num_mask_classes, epochs=epochs,
            batch_size=batch_size, learning_rate=learning_rate, width=width, seed=seed, dev=dev, augment=augment,
            progress=progress, weight_decay=weight_decay, pretrain=pretrain)
        n = len(train)
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()
        evaluation = evaluate(model, task, test, num_classes=num_classes, num_mask_classes=num_mask_classes,
                              batch_size=batch_size, device=device, class_names=class_names,
                              mask_class_names=mask_class_names)
        metrics, y_true, y_prob, per_sample = (evaluation[k] for k in ("metrics", "y_true", "y_prob", "per_sample_dice"))
        eval_seconds = time.perf_counter() - start
        if save_to is not None:
            save_network(model, spec, save_to)

    return TrainResult(
        task=task, metrics=metrics, y_true=y_true, y_prob=y_prob, per_sample_dice=per_sample,
        test_ids=list(test.ids), train_size=n, test_size=len(test), epochs=epochs,
        train_seconds=train_seconds, eval_seconds=eval_seconds, loss_history=history,
    ).to_dict() | ({"pretrain_size": len(pretrain), "pretrain_loss_history": pretrain_history} if pretrain is not None else {})


def train_network(task: str, train: ImageSet, *, num_classes: int, num_mask_classes: Optional[int], epochs: int,
                  batch_size: int, learning_rate: float, width: int, seed: int, device: str = "cpu",
                  weight_decay: float = 1e-4) -> nn.Module:
    """A fresh network of the study's kind trained on ``train`` as :func:`fit_and_evaluate` trains it
    (same seed, same network), in eval mode; nothing is scored. The caller's RNG state is kept."""
    _validate(task, train, train, num_classes, num_mask_classes, epochs, batch_size, learning_rate, width)
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        model, *_ = _fit(task, train, num_classes=num_classes, num_mask_classes=num_mask_classes, epochs=epochs,
                         batch_size=batch_size, learning_rate=learning_rate, width=width, seed=seed, dev=dev,
                         augment=None, progress=None, weight_decay=weight_decay, pretrain=None)
    return model.eval()


def _fit(task: str, train: ImageSet, *, num_classes: int, num_mask_classes: Optional[int], epochs: int,
         batch_size: int, learning_rate: float, width: int, seed: int, dev: torch.device,
         augment: Optional[Callable], progress: Optional[Callable[[dict], None]], weight_decay: float,
         pretrain: Optional[ImageSet]) -> tuple[nn.Module, NetworkSpec, list[float], list[float]]:
    """Seed, build and train (optionally pretraining first); inside the caller's ``fork_rng``."""
    seg = task == "segmentation"
    torch.manual_seed(seed)
    spec = NetworkSpec(task, train.dims, num_mask_classes if seg else num_classes, width, train.num_channels)
    model = spec.build().to(dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True) if seg else nn.CrossEntropyLoss()
    pretrain_history: list[float] = []
    if pretrain is not None and len(pretrain) > 0:
        # synthetic_pretrain: the whole schedule on synthetic data, then a fresh one on real data.
        pretrain_history = _train_epochs(model, pretrain, seg, loss_fn, epochs, batch_size, learning_rate,
                                         weight_decay, seed + 1, dev, augment, None, "pretrain")
    history = _train_epochs(model, train, seg, loss_fn, epochs, batch_size, learning_rate, weight_decay, seed, dev,
                            augment, progress, "train")
    return model, spec, history, pretrain_history


def _train_epochs(model: nn.Module, data: ImageSet, seg: bool, loss_fn, epochs: int, batch_size: int,
                  learning_rate: float, weight_decay: float, seed: int, dev: torch.device,
                  augment: Optional[Callable], progress: Optional[Callable[[dict], None]], phase: str) -> list[float]:
    """``epochs`` of AdamW with a per-step cosine schedule on ``data``; returns the mean loss per epoch."""
    x_all = torch.from_numpy(np.ascontiguousarray(data.images, dtype=np.float32))
    y_all = torch.from_numpy(np.ascontiguousarray(data.masks if seg else data.labels)).long()
    n = len(data)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps)
    shuffle = torch.Generator().manual_seed(seed)
    history: list[float] = []
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=shuffle)
        total, count = 0.0, 0
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # batch norm cannot train on one sample; it rejoins next epoch
                continue
            xb, yb = x_all[idx], y_all[idx]
            if augment is not None:
                xb, mb = augment(xb, yb if seg else None)
                yb = mb.long() if seg else yb
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            logits = model(xb)
            loss = loss_fn(logits, yb.unsqueeze(1)) if seg else loss_fn(logits, yb)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
        if progress is not None:
            progress({"epoch": epoch + 1, "epochs": epochs, "train_loss": history[-1], "phase": phase,
                      "lr": schedule.get_last_lr()[0], "seconds": time.perf_counter() - start})
    return history
