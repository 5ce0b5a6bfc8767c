"""The segmentation network: torchvision DeepLabV3 with a ResNet-50 backbone."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bcseg.classes import NUM_CLASSES

ARCHITECTURE = "deeplabv3_resnet50"
# Ratio of input pixels to feature-map pixels in torchvision's DeepLabV3-ResNet50.
OUTPUT_STRIDE = 8

# ImageNet statistics, the usual normalization for a ResNet-50 backbone.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationNet(nn.Module):
    """DeepLabV3-ResNet50 returning logits of shape (batch, classes, height, width).

    torchvision's model returns a dict; this wrapper returns the "out" tensor so that callers,
    tracing and compilation see a plain tensor. With ``image_pooling_px`` set, the ASPP image
    pooling branch averages over a window of that many input pixels around each position at
    inference (WindowedImagePooling), instead of over the whole input.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, image_pooling_px: int | None = None):
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet50

        # weights=None and weights_backbone=None: nothing is downloaded.
        self.net = deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )
        if image_pooling_px:
            aspp = self.net.classifier[0]
            aspp.convs[-1] = WindowedImagePooling(aspp.convs[-1], max(1, image_pooling_px // OUTPUT_STRIDE))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)["out"]


class WindowedImagePooling(nn.Module):
    """ASPP's image pooling branch, averaged over a sliding window at inference.

    In training the branch averages the whole patch, so the model learns image-level context of
    one patch. At inference on a larger tile or region, the global average would mix in context
    the model never saw in one piece and make each prediction depend on the window it was cut
    from. Averaging over a patch-sized window around each position instead keeps the training
    context and makes tiled and whole-region predictions agree more closely. The window mean is
    computed with summed-area tables, so its cost does not grow with the window.

    The wrapped torchvision ``ASPPPooling`` keeps its parameter names, so checkpoints load
    either way.
    """

    def __init__(self, pooling: nn.Sequential, window: int):
        super().__init__()
        self.pooling = pooling
        self.window = window

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.pooling(features)
        mean = _window_mean(features, self.window)
        for layer in list(self.pooling)[1:]:  # the 1x1 convolution, batch norm and ReLU
            mean = layer(mean)
        return mean

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Keys are those of the wrapped module ("...convs.4.1.weight"): map them to "pooling.".
        for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(prefix + "pooling.")]:
            state_dict[prefix + "pooling." + key[len(prefix):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return self.pooling.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)


def _window_mean(features: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of a ``window`` x ``window`` neighbourhood of each position, kept inside the input.

    Near an edge the window shifts inwards rather than shrinking, so every position averages the
    same amount of context, and an input of exactly one window gives the global mean. Along an
    axis shorter than the window, the whole axis is averaged.
    """
    rows, cols = features.shape[-2:]
    window_rows, window_cols = min(window, rows), min(window, cols)
    table = F.pad(features.float().cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    # Sums of every full window, indexed by its top-left position.
    sums = (table[..., window_rows:, window_cols:] - table[..., :-window_rows, window_cols:]
            - table[..., window_rows:, :-window_cols] + table[..., :-window_rows, :-window_cols])
    top = (torch.arange(rows, device=features.device) - window_rows // 2).clamp(0, rows - window_rows)
    left = (torch.arange(cols, device=features.device) - window_cols // 2).clamp(0, cols - window_cols)
    means = sums[..., top, :][..., left] / (window_rows * window_cols)
    return means.to(features.dtype)


def build_model(
    architecture: str = ARCHITECTURE, num_classes: int = NUM_CLASSES, image_pooling_px: int | None = None
) -> SegmentationNet:
    if architecture != ARCHITECTURE:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {ARCHITECTURE}")
    return SegmentationNet(num_classes, image_pooling_px)
