"""Metrics on hand-made cases whose answers are worked out by hand in the comments."""

import math

import numpy as np
import pytest

from raysynth.downstream.metrics import (
    classification_metrics,
    expected_calibration_error,
    reliability_curve,
    segmentation_metrics,
)

BINARY = ["healthy", "lesion"]
FOUR = ["a", "b", "c", "d"]


pytestmark = pytest.mark.usefixtures("one_thread")


def one_hot_prob(pred, k, conf=0.9):
    p = np.full((len(pred), k), (1 - conf) / (k - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


# ---- classification ---------------------------------------------------------------------------

@pytest.mark.parametrize("k,names", [(2, BINARY), (4, FOUR)])
def test_perfect_predictions_score_one(k, names):
    y = np.array([0, 1, 1, 0] if k == 2 else [0, 1, 2, 3, 3, 2, 1, 0])
    m = classification_metrics(y, one_hot_prob(y, k), names)
    for key in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc"):
        assert m[key] == pytest.approx(1.0), key
    assert m["confusion_matrix"] == np.diag(np.bincount(y, minlength=k)).tolist()
    assert m["notes"] == []


@pytest.mark.parametrize("k,names", [(2, BINARY), (4, FOUR)])
def test_all_wrong_predictions_score_zero(k, names):
    y = np.array([0, 1, 1, 0] if k == 2 else [0, 1, 2, 3, 3, 2, 1, 0])
    wrong = (y + 1) % k
    m = classification_metrics(y, one_hot_prob(wrong, k), names)
    assert m["accuracy"] == 0.0 and m["balanced_accuracy"] == 0.0 and m["sensitivity"] == 0.0
    if k == 2:  # every negative called positive: specificity 0, and the scores rank exactly backwards
        assert m["specificity"] == 0.0 and m["auc"] == 0.0


def test_binary_hand_computed():
    # true:  0    0    1    1    1 ; P(lesion): 0.6 0.2 0.8 0.4 0.7 -> pred 1 0 1 0 1
    y = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.6, 0.2, 0.8, 0.4, 0.7])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), BINARY)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)  # TP 2 of 3 lesions
    assert m["specificity"] == pytest.approx(1 / 2)  # TN 1 of 2 healthy
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # AUC: positive scores {.8,.4,.7} vs negative {.6,.2}: pairs won 2+1+2 = 5 of 6.
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["sensitivity_per_class"]["healthy"] == pytest.approx(1 / 2)


def test_four_class_with_absent_class_is_skipped_and_noted():
    y = np.array([0, 0, 1, 1, 2, 2])  # class "d" never occurs
    pred = np.array([0, 0, 1, 2, 2, 3])
    m = classification_metrics(y, one_hot_prob(pred, 4), FOUR)
    assert math.isnan(m["sensitivity_per_class"]["d"])
    assert m["sensitivity"] == pytest.approx((1 + 0.5 + 0.5) / 3)  # macro over present classes
    assert math.isnan(m["auc_per_class"]["d"]) and np.isfinite(m["auc"])
    assert any("'d'" in note for note in m["notes"])
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_binary_single_class_auc_is_nan_with_note():
    y = np.array([1, 1, 1])
    m = classification_metrics(y, one_hot_prob(np.array([1, 0, 1]), 2), BINARY)
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert any("auc" in note for note in m["notes"])


@pytest.mark.parametrize(
    "y,prob,names,match",
    [
        (np.array([0, 1]), np.ones((3, 2)) / 2, BINARY, "y_true"),
        (np.array([0, 2]), np.ones((2, 2)) / 2, BINARY, r"\[0, 2\]"),
        (np.array([0, 1]), np.ones((2, 2)) / 2, ["x"], "class_names"),
        (np.array([0.0, 1.0]), np.ones((2, 2)) / 2, BINARY, "integer"),
        (np.array([0, 1]), np.ones(2), BINARY, "y_prob"),
    ],
)
def test_classification_invalid_inputs(y, prob, names, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, prob, names)


def test_ece_and_reliability_curve_hand_computed():
    y = np.array([0, 1, 0, 1])
    perfect = one_hot_prob(y, 2, conf=1.0)
    assert expected_calibration_error(y, perfect) == pytest.approx(0.0)
    # Confidence 0.9 everywhere but only half right: ECE = |0.5 - 0.9| = 0.4, all in the top bin.
    half = one_hot_prob(np.array([0, 0, 0, 0]), 2, conf=0.9)
    assert expected_calibration_error(y, half) == pytest.approx(0.4)
    curve = reliability_curve(y, half, n_bins=10)
    assert curve["count"][8] == 4 and sum(curve["count"]) == 4  # 0.9 lies in (0.8, 0.9]
    assert curve["accuracy"][8] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n_bins"):
        reliability_curve(y, half, n_bins=0)


# ---- segmentation -----------------------------------------------------------------------------

def square(shape, lo, hi, label=1):
    m = np.zeros(shape, dtype=np.uint8)
    m[tuple(slice(lo, hi) for _ in shape)] = label
    return m


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
def test_segmentation_perfect_and_disjoint(shape):
    target = np.stack([square(shape, 2, 5), square(shape, 4, 7)])
    perfect = segmentation_metrics(target, target, 2)
    assert perfect["mean_dice"] == pytest.approx(1.0) and perfect["mean_hd95"] == pytest.approx(0.0)
    assert perfect["per_sample_dice"] == pytest.approx([1.0, 1.0])
    disjoint = np.stack([square(shape, 6, 8), square(shape, 0, 2)])
    wrong = segmentation_metrics(disjoint, target, 2, ["bg", "lesion"])
    assert wrong["dice"]["lesion"] == 0.0 and wrong["mean_hd95"] > 0


def test_segmentation_hand_computed_dice_hd95_and_spacing():
    target = np.zeros((1, 10, 10), np.uint8)
    target[0, 2, 2] = target[0, 2, 3] = 1
    pred = np.zeros_like(target)
    pred[0, 2, 2:6] = 1
    # Dice = 2 * 2 / (4 + 2) = 2/3.
    assert segmentation_metrics(pred, target, 2)["mean_dice"] == pytest.approx(2 / 3)
    # Single pixels 4 apart along axis 0: HD95 = 4 voxels, 8 mm with 2 mm spacing on that axis.
    a = np.zeros((1, 10, 10), np.uint8)
    b = np.zeros_like(a)
    a[0, 2, 2], b[0, 6, 2] = 1, 1
    assert segmentation_metrics(a, b, 2)["mean_hd95"] == pytest.approx(4.0)
    assert segmentation_metrics(a, b, 2, spacing=(2.0, 1.0))["mean_hd95"] == pytest.approx(8.0)


def test_segmentation_empty_masks_follow_nnunet_convention():
    shape = (12, 12)
    empty = np.zeros(shape, np.uint8)
    target = np.stack([square(shape, 2, 6), empty, empty])
    pred = np.stack([square(shape, 2, 6), empty, square(shape, 1, 3)])
    m = segmentation_metrics(pred, target, 2)
    assert m["per_sample_dice"][0] == pytest.approx(1.0)
    assert math.isnan(m["per_sample_dice"][1])  # both empty: no information
    assert m["per_sample_dice"][2] == 0.0  # a false positive on an empty target
    assert m["mean_dice"] == pytest.approx(0.5)  # nanmean of 1 and 0
    assert m["mean_hd95"] == pytest.approx(0.0)  # only sample 0 has two surfaces
    assert len(m["notes"]) == 2


def test_segmentation_multiclass_with_a_class_never_present():
    shape = (12, 12)
    target = np.stack([square(shape, 2, 6, 1), square(shape, 5, 9, 2)])
    m = segmentation_metrics(target, target, 4, ["bg", "a", "b", "c"])
    assert set(m["dice"]) == {"a", "b", "c"}
    assert math.isnan(m["dice"]["c"]) and m["dice"]["a"] == 1.0 and m["mean_dice"] == 1.0


@pytest.mark.parametrize(
    "pred,target,k,kwargs,match",
    [
        (np.zeros((1, 8, 8)), np.zeros((1, 8, 9)), 2, {}, "shape"),
        (np.zeros((8, 8)), np.zeros((8, 8)), 2, {}, "pred"),
        (np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), 1, {}, "num_classes"),
        (np.full((1, 8, 8), 3), np.zeros((1, 8, 8)), 2, {}, "pred"),
        (np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), 2, {"class_names": ["bg"]}, "class_names"),
        (np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), 2, {"spacing": (1.0,)}, "spacing"),
    ],
)
def test_segmentation_invalid_inputs(pred, target, k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        segmentation_metrics(pred.astype(np.uint8), target.astype(np.uint8), k, **kwargs)
