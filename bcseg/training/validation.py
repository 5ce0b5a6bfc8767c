"""Validation during training: scores on the validation split and on an optional extra folder."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from bcseg.classes import CLASS_NAMES, NUM_CLASSES
from bcseg.metrics import binary_dice, confusion_matrix, summarize
from bcseg.model import IMAGENET_MEAN, IMAGENET_STD
from bcseg.training.data import Region, load_binary_validation, load_regions, find_pairs
from bcseg.training.predict import predict_labels

TUMOR_CHANNEL = CLASS_NAMES.index("tumor")


@dataclass
class Validation:
    """Validation regions with BCSS codes (from the split or a folder), and tumour-versus-rest regions."""

    regions: list[Region]
    binary_regions: list[tuple[str, np.ndarray, np.ndarray]]
    window_px: int
    margin_px: int

    @classmethod
    def create(cls, config, split_regions: list[Region], stain_normalizer) -> Validation | None:
        """Collect the split's validation regions and ``config.val_dir``; None when there are none."""
        regions = list(split_regions)
        binary_regions = []
        if config.val_dir is not None:
            if config.val_binary:
                binary_regions = load_binary_validation(config.val_dir, config.mpp, config.data_mpp, stain_normalizer)
            else:
                from bcseg.classes import code_lookup_table

                pairs = find_pairs(config.val_dir)
                lookup = code_lookup_table(config.groups)
                regions += load_regions(pairs, config.groups, lookup, config.mpp, config.data_mpp, stain_normalizer)
        if not regions and not binary_regions:
            return None
        # Windows twice the inference tile side spend less time on overlaps than tile-sized ones.
        window = 2 * config.inference_tile_size
        return cls(regions, binary_regions, window, min(32, window // 8))

    @property
    def score_name(self) -> str:
        return "mean Dice" if self.regions else "tumour Dice"

    @torch.no_grad()
    def run(self, model: torch.nn.Module, device: torch.device, autocast_dtype=None) -> dict:
        """Return {"validation": class scores or None, "validation_binary": tumour scores or None}."""
        was_training = model.training
        model.eval()
        started = time.monotonic()
        try:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                scores = {
                    "validation": self._class_scores(model) if self.regions else None,
                    "validation_binary": self._binary_scores(model) if self.binary_regions else None,
                }
        finally:
            model.train(was_training)
        scores["validation_seconds"] = round(time.monotonic() - started, 1)
        return scores

    def _labels(self, model, rgb: np.ndarray) -> np.ndarray:
        return predict_labels(model, rgb, IMAGENET_MEAN, IMAGENET_STD, window_px=self.window_px, margin_px=self.margin_px)

    def _class_scores(self, model) -> dict:
        matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        for region in self.regions:
            matrix += confusion_matrix(region.labels, self._labels(model, region.image), NUM_CLASSES)
        return {"regions": [region.name for region in self.regions], **summarize(matrix, CLASS_NAMES)}

    def _binary_scores(self, model) -> dict:
        truths, predictions = [], []
        for _, rgb, tumor in self.binary_regions:
            truths.append(tumor.ravel())
            predictions.append(self._labels(model, rgb).ravel() == TUMOR_CHANNEL)
        truth, predicted = np.concatenate(truths), np.concatenate(predictions)
        return {
            "regions": [name for name, _, _ in self.binary_regions],
            "tumor_dice": binary_dice(truth, predicted),
            "tumor_fraction_true": float(truth.mean()),
            "tumor_fraction_predicted": float(predicted.mean()),
            "pixel_accuracy": float((truth == predicted).mean()),
        }


def selection_score(scores: dict | None) -> tuple[str | None, float | None]:
    """Return the score that picks the best checkpoint: validation mean Dice, else tumour-versus-rest Dice."""
    if not scores:
        return None, None
    validation = scores.get("validation") or {}
    if validation.get("mean_dice") is not None:
        return "mean Dice", validation["mean_dice"]
    binary = scores.get("validation_binary") or {}
    if binary.get("tumor_dice") is not None:
        return "tumour Dice", binary["tumor_dice"]
    return None, None
