"""Training loss: class-weighted cross-entropy plus soft Dice, both blind to ignored pixels."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bcseg.classes import IGNORE_INDEX


class DiceCrossEntropyLoss(nn.Module):
    """``cross_entropy + dice_weight * (1 - mean soft Dice)`` over the pixels whose target is not ignored.

    Soft Dice per class is ``(2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` over the batch,
    with ``p`` the softmax probability and ``t`` the one-hot target, averaged over all classes.
    Cross-entropy rewards getting each pixel right; Dice rewards overlap per class, so small
    classes count as much as large ones. ``forward`` returns the total and stores both parts in
    ``last_parts`` for logging.
    """

    def __init__(
        self,
        class_weights: torch.Tensor | None = None,
        dice_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        smooth: float = 1.0,
    ):
        super().__init__()
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)
        self.dice_weight = dice_weight
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.last_parts: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        cross_entropy = F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index)
        if not self.dice_weight:
            self.last_parts = {"cross_entropy": float(cross_entropy.detach())}
            return cross_entropy

        valid = (target != self.ignore_index).unsqueeze(1)
        probabilities = logits.softmax(dim=1) * valid
        one_hot = F.one_hot(target.where(valid.squeeze(1), 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
        dims = (0, 2, 3)
        overlap = (probabilities * one_hot).sum(dims)
        total = probabilities.sum(dims) + one_hot.sum(dims)
        dice = (2 * overlap + self.smooth) / (total + self.smooth)
        dice_loss = 1 - dice.mean()
        self.last_parts = {"cross_entropy": float(cross_entropy.detach()), "dice_loss": float(dice_loss.detach())}
        return cross_entropy + self.dice_weight * dice_loss
