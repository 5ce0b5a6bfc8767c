"""Segmentation scores: confusion matrix with an ignore index, per-class Dice and IoU, pixel accuracy.

Label arrays hold class indices ``0 .. num_classes - 1``. Target pixels equal to ``ignore_index``
count nowhere: not in the confusion matrix, not in any score.
"""

from __future__ import annotations

import numpy as np

from bcseg.classes import IGNORE_INDEX


def confusion_matrix(
    target: np.ndarray, prediction: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Count pixels per (target class, predicted class); rows are the target.

    Returns an int64 array of shape (num_classes, num_classes). Raises ValueError when the
    shapes differ or a label outside ``0 .. num_classes - 1`` is found (ignored target pixels
    excepted).
    """
    target = np.asarray(target)
    prediction = np.asarray(prediction)
    if target.shape != prediction.shape:
        raise ValueError(f"target shape {target.shape} differs from prediction shape {prediction.shape}")

    keep = target != ignore_index
    target_kept = target[keep].astype(np.int64)
    prediction_kept = prediction[keep].astype(np.int64)
    for name, values in (("target", target_kept), ("prediction", prediction_kept)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} has labels outside 0..{num_classes - 1}: {sorted(set(np.unique(values)) - set(range(num_classes)))}"
            )

    counts = np.bincount(target_kept * num_classes + prediction_kept, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_dice(matrix: np.ndarray) -> np.ndarray:
    """Dice ``2 TP / (2 TP + FP + FN)`` per class; NaN for a class absent from target and prediction."""
    true_positive = np.diag(matrix).astype(np.float64)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * true_positive / denominator, np.nan)


def per_class_iou(matrix: np.ndarray) -> np.ndarray:
    """IoU ``TP / (TP + FP + FN)`` per class; NaN for a class absent from target and prediction."""
    true_positive = np.diag(matrix).astype(np.float64)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / union, np.nan)


def per_class_precision(matrix: np.ndarray) -> np.ndarray:
    """Precision ``TP / (TP + FP)`` per class; NaN for a class never predicted."""
    predicted = matrix.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(predicted > 0, np.diag(matrix) / predicted, np.nan)


def per_class_recall(matrix: np.ndarray) -> np.ndarray:
    """Recall ``TP / (TP + FN)`` per class; NaN for a class absent from the target."""
    actual = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(actual > 0, np.diag(matrix) / actual, np.nan)


def pixel_accuracy(matrix: np.ndarray) -> float:
    """Fraction of counted pixels whose prediction equals the target; NaN when none are counted."""
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else float("nan")


def binary_dice(target: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two boolean masks of equal shape; 1.0 when both are empty."""
    target = np.asarray(target, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if target.shape != prediction.shape:
        raise ValueError(f"target shape {target.shape} differs from prediction shape {prediction.shape}")
    denominator = int(target.sum()) + int(prediction.sum())
    if denominator == 0:
        return 1.0
    return 2.0 * int(np.logical_and(target, prediction).sum()) / denominator


def summarize(matrix: np.ndarray, class_names: list[str] | tuple[str, ...]) -> dict[str, object]:
    """Scores of one confusion matrix as a JSON-ready dict: per-class Dice, IoU, precision and
    recall, the means of Dice and IoU over classes present, and pixel accuracy.

    A matrix may have more classes than ``class_names``: the extra trailing ones (such as a
    "not tissue" prediction that no target has) count as errors but get no scores of their own.
    """
    scored = len(class_names)
    dice = per_class_dice(matrix)[:scored]
    iou = per_class_iou(matrix)[:scored]
    return {
        "dice": {name: _none_if_nan(value) for name, value in zip(class_names, dice)},
        "iou": {name: _none_if_nan(value) for name, value in zip(class_names, iou)},
        "precision": {name: _none_if_nan(value) for name, value in zip(class_names, per_class_precision(matrix)[:scored])},
        "recall": {name: _none_if_nan(value) for name, value in zip(class_names, per_class_recall(matrix)[:scored])},
        "mean_dice": _none_if_nan(np.nanmean(dice)) if np.any(~np.isnan(dice)) else None,
        "mean_iou": _none_if_nan(np.nanmean(iou)) if np.any(~np.isnan(iou)) else None,
        "pixel_accuracy": _none_if_nan(pixel_accuracy(matrix)),
        "pixels": int(matrix.sum()),
    }


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
