"""The segmentation network: torchvision DeepLabV3 with a ResNet-50 backbone."""

from __future__ import annotations

import torch
from torch import nn

from bcseg.classes import NUM_CLASSES

ARCHITECTURE = "deeplabv3_resnet50"

# ImageNet statistics, the usual normalization for a ResNet-50 backbone.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationNet(nn.Module):
    """DeepLabV3-ResNet50 returning logits of shape (batch, classes, height, width).

    torchvision's model returns a dict; this wrapper returns the "out" tensor so that callers,
    tracing and compilation see a plain tensor.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet50

        # weights=None and weights_backbone=None: nothing is downloaded.
        self.net = deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)["out"]


def build_model(architecture: str = ARCHITECTURE, num_classes: int = NUM_CLASSES) -> SegmentationNet:
    if architecture != ARCHITECTURE:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {ARCHITECTURE}")
    return SegmentationNet(num_classes)
