"""Downstream networks and fit_and_evaluate on tiny, trivially learnable data sets."""

import numpy as np
import pytest
import torch

from raysynth.data.schema import ImageSet
from raysynth.downstream.augment import build_classical_augment
from raysynth.downstream.models import build_classifier, build_segmenter, fit_and_evaluate


def squares(n, size=16, dims=2, seed=0, channels=1):
    """Class 1 carries a bright square (or cube) of side min(6, size/2) at a random place; class 0
    only noise.
    The mask marks the square, so the same set serves segmentation."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.normal(-0.6, 0.1, (n,) + (size,) * dims).astype(np.float32)
    masks = np.zeros(images.shape, np.uint8)
    for i in np.flatnonzero(labels):
        side = min(6, size // 2)
        corner = rng.integers(1, size - side, dims)
        region = (i,) + tuple(slice(c, c + side) for c in corner)
        images[region] += 1.2
        masks[region] = 1
    ids = [f"s{seed}_{i}" for i in range(n)]
    images = np.clip(images, -1, 1)[:, None]
    if channels > 1:  # more sequences: the same square, at other contrasts (one inverted)
        images = np.concatenate([images] + [images * (-1.0 if c % 2 else 0.8) for c in range(1, channels)], axis=1)
    return ImageSet(ids=ids, subjects=ids, labels=labels, images=images.astype(np.float32), masks=masks)


COMMON = dict(batch_size=8, learning_rate=3e-3, width=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "dims,in_channels,num_classes,size",
    [(2, 1, 2, 16), (2, 2, 4, 32), (3, 1, 2, 8), (3, 1, 3, 16)],
)
def test_classifier_output_shape(dims, in_channels, num_classes, size):
    net = build_classifier(dims, in_channels, num_classes, width=4).eval()
    out = net(torch.zeros((2, in_channels) + (size,) * dims))
    assert out.shape == (2, num_classes)


@pytest.mark.parametrize("dims,in_channels,num_classes,size", [(2, 1, 2, 16), (2, 1, 3, 32), (3, 1, 2, 16)])
def test_segmenter_output_shape(dims, in_channels, num_classes, size):
    out = build_segmenter(dims, in_channels, num_classes, width=4)(torch.zeros((2, in_channels) + (size,) * dims))
    assert out.shape == (2, num_classes) + (size,) * dims


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((1, 1, 2, 8), {}, "dims: 1"),
        ((2, 0, 2, 8), {}, "in_channels: 0"),
        ((2, 1, 1, 8), {}, "num_classes: 1"),
        ((3, 1, 2, 0), {}, "width: 0"),
        ((2, 1, 2, 8), {"norm": "group"}, "'group'"),
        ((2, 1, 2, 8), {"dropout": 1.0}, "dropout: 1.0"),
    ],
)
def test_classifier_invalid_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_classifier(*args, **kwargs)


def test_segmenter_invalid_arguments():
    with pytest.raises(ValueError, match="dims: 4"):
        build_segmenter(4, 1, 2, 8)


def classify(train, test, seed=0, epochs=6, **kw):
    return fit_and_evaluate("classification", train, test, num_classes=2, num_mask_classes=None,
                            epochs=epochs, seed=seed, **(COMMON | kw))


def test_classification_learns_a_bright_square_2d():
    seen = []
    r = classify(squares(64), squares(32, seed=1), progress=seen.append)
    assert r["metrics"]["accuracy"] >= 0.9 and r["metrics"]["auc"] >= 0.95
    assert r["train_size"] == 64 and r["test_size"] == 32 and r["epochs"] == 6
    assert np.allclose(np.sum(r["y_prob"], axis=1), 1.0) and len(r["y_true"]) == 32
    assert [p["epoch"] for p in seen] == list(range(1, 7)) and seen[-1]["train_loss"] < seen[0]["train_loss"]
    assert r["per_sample_dice"] is None and r["train_seconds"] > 0


def test_pretraining_on_a_second_set_runs_first_and_changes_the_network():
    """synthetic_pretrain: the whole schedule on the pretraining set, then fine-tuning on ``train``."""
    train, test, other = squares(24), squares(16, seed=1), squares(40, seed=2)
    plain = classify(train, test, seed=3, epochs=2)
    pre = classify(train, test, seed=3, epochs=2, pretrain=other)
    assert pre["pretrain_size"] == 40 and len(pre["pretrain_loss_history"]) == 2 and "pretrain_size" not in plain
    assert pre["train_size"] == 24 and pre["y_prob"] != plain["y_prob"]
    # fine-tuning starts from the pretrained weights: its first epoch's loss is already lower
    assert pre["loss_history"][0] < plain["loss_history"][0]


def test_classification_is_deterministic_and_leaves_caller_rng_alone():
    train, test = squares(24), squares(8, seed=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    r1 = classify(train, test, seed=5, epochs=2)
    assert torch.equal(torch.get_rng_state(), before)
    r2 = classify(train, test, seed=5, epochs=2)
    r3 = classify(train, test, seed=6, epochs=2)
    assert r1["y_prob"] == r2["y_prob"] and r1["loss_history"] == r2["loss_history"]
    assert r1["y_prob"] != r3["y_prob"]


def test_classification_runs_in_3d_with_augmentation():
    train, test = squares(12, size=8, dims=3), squares(4, size=8, dims=3, seed=1)
    r = classify(train, test, epochs=2, augment=build_classical_augment(3, 0, segmentation=False))
    assert len(r["y_prob"]) == 4 and len(r["y_prob"][0]) == 2
    assert set(r["metrics"]) >= {"accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc"}


def test_segmentation_learns_blobs_well_above_chance():
    train, test = squares(32), squares(12, seed=1)
    r = fit_and_evaluate("segmentation", train, test, num_classes=2, num_mask_classes=2, epochs=10,
                         seed=0, mask_class_names=["bg", "square"], **(COMMON | dict(batch_size=4, learning_rate=1e-2)))
    # Chance (all foreground) would score ~2*36/(36+256) = 0.25 on the squares.
    assert r["metrics"]["dice"]["square"] > 0.7
    assert len(r["per_sample_dice"]) == 12 and r["y_prob"] is None
    per_sample = np.asarray(r["per_sample_dice"])
    assert np.all(per_sample[test.labels == 1] > 0.5)
    # Images without a square: nan when the prediction is empty too (no information), else 0.
    empty = per_sample[test.labels == 0]
    assert np.all(np.isnan(empty) | (empty == 0)) and np.isnan(empty).sum() >= 4


def test_segmentation_runs_in_3d_with_augmentation():
    train, test = squares(6, size=8, dims=3), squares(2, size=8, dims=3, seed=1)
    r = fit_and_evaluate("segmentation", train, test, num_classes=2, num_mask_classes=2, epochs=1, seed=0,
                         augment=build_classical_augment(3, 0, segmentation=True), **COMMON)
    assert r["epochs"] == 1 and len(r["loss_history"]) == 1 and "mean_hd95" in r["metrics"]


@pytest.mark.parametrize(
    "task,train,kwargs,match",
    [
        ("regression", squares(4), {}, "'regression'"),
        ("classification", squares(4, size=12), {"test_size": 16}, "differs from train"),
        ("classification", squares(4, size=6), {}, "below 8"),
        ("classification", squares(4), {"epochs": 0}, "epochs: 0"),
        ("classification", squares(4), {"batch_size": 1}, "batch_size: 1"),
        ("classification", squares(4), {"learning_rate": 0.0}, "learning_rate: 0.0"),
        ("classification", squares(4), {"num_classes": 1}, "num_classes: 1"),
        ("segmentation", squares(4), {"num_mask_classes": None}, "num_mask_classes: None"),
        ("segmentation", squares(4, size=10), {"num_mask_classes": 2}, "divisible by 4"),
    ],
)
def test_fit_and_evaluate_invalid_arguments(task, train, kwargs, match):
    args = dict(num_classes=2, num_mask_classes=None, epochs=1, batch_size=4, learning_rate=1e-3,
                width=4, seed=0) | kwargs
    test = squares(2, size=args.pop("test_size", train.images.shape[-1]), seed=1)
    with pytest.raises(ValueError, match=match):
        fit_and_evaluate(task, train, test, **args)


def test_segmentation_without_masks_is_rejected():
    unmasked = squares(4)
    unmasked.masks = None
    with pytest.raises(ValueError, match="masks"):
        fit_and_evaluate("segmentation", unmasked, squares(2, seed=1), num_classes=2, num_mask_classes=2,
                         epochs=1, batch_size=4, learning_rate=1e-3, width=4, seed=0)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_three_channel_inputs_train_evaluate_and_reload(task, tmp_path):
    """C = 3 sequences: the network reads every channel; the saved spec rebuilds it."""
    from raysynth.downstream.models import load_network, predict

    train, test = squares(8, channels=3), squares(4, seed=1, channels=3)
    assert train.images.shape == (8, 3, 16, 16)
    seg = task == "segmentation"
    r = fit_and_evaluate(task, train, test, num_classes=2, num_mask_classes=2 if seg else None, epochs=1, seed=0,
                         augment=build_classical_augment(2, 0, segmentation=seg), save_to=tmp_path / "net.pt", **COMMON)
    assert r["test_size"] == 4
    model, spec = load_network(tmp_path / "net.pt")
    assert spec.in_channels == 3
    out = predict(model, task, test.images, batch_size=4)
    assert out.shape == ((4, 16, 16) if seg else (4, 2))
    with pytest.raises(ValueError, match="differs from train"):
        fit_and_evaluate(task, train, squares(4, seed=1), num_classes=2, num_mask_classes=2 if seg else None,
                         epochs=1, seed=0, **COMMON)
