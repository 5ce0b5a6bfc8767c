"""Training augmentations: dihedral transforms, and colour jitter that follows the H&E stains.

Colour jitter perturbs each stain's optical density in HED space (haematoxylin, eosin, DAB),
after Tellez et al., "Quantifying the effects of data augmentation and stain color normalization
in convolutional neural networks for computational pathology", Medical Image Analysis 58, 2019.
scikit-image's ``rgb2hed`` and ``hed2rgb`` do the colour deconvolution with Ruifrok and Johnston's
stain vectors, as scikit-image's ``hed_from_rgb`` and ``rgb_from_hed`` matrices give them. The
densities are not clipped at zero (``skimage.color.rgb2hed`` clips them, which shifts the colour
of about 5% of the pixels of a BCSS region even with no jitter), so zero jitter returns the patch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transforms applied to each training patch."""

    scale_range: tuple[float, float] = (0.8, 1.25)  # zoom factor, drawn log-uniformly
    hed_scale: float = 0.05  # each stain's density is multiplied by 1 +- this
    hed_shift: float = 0.05  # and shifted by +- this, in HED units
    # Saturation varies most between H&E scans here: the mean HSV saturation of the BCSS regions in
    # the development data is 123 (A0D2), 90 (A0SK) and 82 (A1G6), so it is scaled by up to -40%.
    saturation_range: tuple[float, float] = (0.6, 1.15)
    brightness_range: tuple[float, float] = (0.88, 1.12)
    contrast_range: tuple[float, float] = (0.85, 1.15)

    def describe(self) -> dict:
        return {"dihedral": "flips and 90-degree rotations", **asdict(self)}


NO_AUGMENTATION = Augmentation(
    scale_range=(1.0, 1.0), hed_scale=0.0, hed_shift=0.0,
    saturation_range=(1.0, 1.0), brightness_range=(1.0, 1.0), contrast_range=(1.0, 1.0),
)


def augment(
    rgb: np.ndarray, labels: np.ndarray, rng: np.random.Generator, augmentation: Augmentation
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a random dihedral transform (flips, 90-degree turns) and colour jitter."""
    turns = int(rng.integers(4))
    rgb, labels = np.rot90(rgb, turns), np.rot90(labels, turns)
    if rng.random() < 0.5:
        rgb, labels = rgb[:, ::-1], labels[:, ::-1]
    return jitter_colour(np.ascontiguousarray(rgb), rng, augmentation), np.ascontiguousarray(labels)


def jitter_colour(rgb: np.ndarray, rng: np.random.Generator, augmentation: Augmentation) -> np.ndarray:
    """Perturb stain densities in HED space, then scale saturation, brightness and contrast."""
    out = rgb
    if augmentation.hed_scale or augmentation.hed_shift:
        scale = rng.uniform(1 - augmentation.hed_scale, 1 + augmentation.hed_scale, size=3)
        shift = rng.uniform(-augmentation.hed_shift, augmentation.hed_shift, size=3)
        out = perturb_stains(rgb, scale, shift)

    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*augmentation.saturation_range), 0, 255)
    out = cv2.cvtColor(hsv.round().astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    mean = out.mean()
    out = (out - mean) * rng.uniform(*augmentation.contrast_range) + mean * rng.uniform(*augmentation.brightness_range)
    return out.round().clip(0, 255).astype(np.uint8)


def perturb_stains(rgb: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Multiply each of the H, E and D stain densities by ``scale`` and add ``shift``."""
    # Optical density per channel; a channel at 0 is taken as 1 so the logarithm stays finite.
    density = -np.log(np.maximum(rgb, 1).astype(np.float32) / 255.0)
    stains = density @ hed_from_rgb.astype(np.float32)
    density = (stains * scale.astype(np.float32) + shift.astype(np.float32)) @ rgb_from_hed.astype(np.float32)
    return (255.0 * np.exp(-density)).round().clip(0, 255).astype(np.uint8)
