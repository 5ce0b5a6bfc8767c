"""Confusion matrix, Dice, IoU and accuracy on hand-made label maps with known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bcseg.classes import IGNORE_INDEX, code_lookup_table
from bcseg.metrics import (
    binary_dice,
    confusion_matrix,
    per_class_dice,
    per_class_iou,
    per_class_precision,
    per_class_recall,
    pixel_accuracy,
    summarize,
)

# 3 classes, 4x4 pixels. Target rows: class 0 (4 px), class 1 (4 px), class 2 (4 px), ignored (4 px).
TARGET = np.array(
    [
        [0, 0, 0, 0],
        [1, 1, 1, 1],
        [2, 2, 2, 2],
        [IGNORE_INDEX] * 4,
    ]
)
PREDICTION = np.array(
    [
        [0, 0, 0, 1],  # 3 right, one class 0 pixel called class 1
        [1, 1, 2, 2],  # 2 right, two class 1 pixels called class 2
        [2, 2, 2, 2],  # all right
        [0, 1, 2, 0],  # ignored: must not count
    ]
)


def test_confusion_matrix_known_counts():
    matrix = confusion_matrix(TARGET, PREDICTION, num_classes=3)
    expected = np.array([[3, 1, 0], [0, 2, 2], [0, 0, 4]])
    np.testing.assert_array_equal(matrix, expected)


def test_ignored_pixels_count_nowhere():
    matrix = confusion_matrix(TARGET, PREDICTION, num_classes=3)
    assert matrix.sum() == 12

    # Changing predictions under ignored targets changes nothing.
    changed = PREDICTION.copy()
    changed[3] = [2, 2, 2, 2]
    np.testing.assert_array_equal(confusion_matrix(TARGET, changed, num_classes=3), matrix)


def test_dice_and_iou_known_values():
    matrix = confusion_matrix(TARGET, PREDICTION, num_classes=3)
    # class 0: TP 3, FP 0, FN 1 -> Dice 6/7, IoU 3/4
    # class 1: TP 2, FP 1, FN 2 -> Dice 4/7, IoU 2/5
    # class 2: TP 4, FP 2, FN 0 -> Dice 8/10, IoU 4/6
    np.testing.assert_allclose(per_class_dice(matrix), [6 / 7, 4 / 7, 8 / 10])
    np.testing.assert_allclose(per_class_iou(matrix), [3 / 4, 2 / 5, 4 / 6])
    assert pixel_accuracy(matrix) == pytest.approx(9 / 12)


def test_precision_and_recall_known_values():
    matrix = confusion_matrix(TARGET, PREDICTION, num_classes=3)
    # precision TP / (TP + FP): 3/3, 2/3, 4/6; recall TP / (TP + FN): 3/4, 2/4, 4/4
    np.testing.assert_allclose(per_class_precision(matrix), [1.0, 2 / 3, 4 / 6])
    np.testing.assert_allclose(per_class_recall(matrix), [3 / 4, 2 / 4, 1.0])
    summary = summarize(matrix, ["a", "b", "c"])
    assert summary["precision"]["b"] == pytest.approx(2 / 3)
    assert summary["recall"]["a"] == pytest.approx(3 / 4)
    assert summary["mean_dice"] == pytest.approx((6 / 7 + 4 / 7 + 8 / 10) / 3)


def test_absent_class_scores_nan():
    target = np.array([[0, 0], [1, 1]])
    matrix = confusion_matrix(target, target, num_classes=3)
    dice = per_class_dice(matrix)
    assert dice[0] == 1.0
    assert dice[1] == 1.0
    assert math.isnan(dice[2])

    summary = summarize(matrix, ["a", "b", "c"])
    assert summary["dice"]["c"] is None
    assert summary["mean_dice"] == 1.0


def test_bcss_ignored_codes_excluded_from_scores():
    # BCSS codes: 0 outside_roi and 7 exclude are ignored; 1 tumor, 2 stroma.
    codes = np.array([[0, 0, 7, 7], [1, 1, 2, 2]], dtype=np.uint8)
    target = code_lookup_table()[codes]
    assert (target[0] == IGNORE_INDEX).all()

    prediction = np.array([[4, 4, 4, 4], [0, 0, 1, 1]])  # wrong only where the target is ignored
    matrix = confusion_matrix(target, prediction, num_classes=5)
    assert matrix.sum() == 4
    assert pixel_accuracy(matrix) == 1.0


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), num_classes=2)
    with pytest.raises(ValueError, match="outside 0..1"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]), num_classes=2)


def test_binary_dice_known_values():
    target = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    prediction = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    assert binary_dice(target, prediction) == pytest.approx(2 * 2 / (3 + 3))
    assert binary_dice(target, target) == 1.0
    assert binary_dice(target, ~target) == 0.0
    assert binary_dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
