"""Stain normalization of H&E images to a target's colours, with torchstain's NumPy normalizers.

Macenko's method (ISBI 2009) estimates each image's haematoxylin and eosin vectors and maps its
stain concentrations onto the target's; Reinhard's (2001) matches the mean and standard deviation
of each LAB channel. A fitted normalizer is stored as a small JSON-ready dict in the checkpoint,
so the model receives the same normalization in training, evaluation and whole-slide inference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from bcseg.errors import BadInputError

log = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard")
# An image with fewer stained pixels than this is left as it is: Macenko's eigenvectors and
# percentiles are unstable on nearly white patches.
MIN_STAINED_FRACTION = 0.05
# Optical density below which a pixel counts as background, as in Macenko et al.
BACKGROUND_DENSITY = 0.15


class StainNormalizer:
    """A normalizer fitted to one target image; ``apply`` maps an RGB uint8 image to its colours."""

    def __init__(self, method: str, parameters: dict[str, Any]):
        import torchstain

        if method not in METHODS:
            raise BadInputError(f"unknown stain normalization {method!r}; choose one of {', '.join(METHODS)}")
        self.method = method
        self.parameters = parameters
        if method == "macenko":
            self._normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
            self._normalizer.HERef = np.asarray(parameters["stain_matrix"], dtype=np.float64)
            self._normalizer.maxCRef = np.asarray(parameters["max_concentrations"], dtype=np.float64)
        else:
            self._normalizer = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
            self._normalizer.target_means = np.asarray(parameters["lab_means"], dtype=np.float64)
            self._normalizer.target_stds = np.asarray(parameters["lab_stds"], dtype=np.float64)

    @classmethod
    def fit(cls, method: str, target_rgb: np.ndarray) -> StainNormalizer:
        """Fit to a target RGB uint8 image, which should be mostly stained tissue."""
        import torchstain

        if method not in METHODS:
            raise BadInputError(f"unknown stain normalization {method!r}; choose one of {', '.join(METHODS)}")
        if method == "macenko":
            normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
            normalizer.fit(target_rgb)
            parameters = {
                "stain_matrix": np.asarray(normalizer.HERef).tolist(),
                "max_concentrations": np.asarray(normalizer.maxCRef).tolist(),
            }
        else:
            normalizer = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
            normalizer.fit(target_rgb)
            parameters = {
                "lab_means": np.asarray(normalizer.target_means).tolist(),
                "lab_stds": np.asarray(normalizer.target_stds).tolist(),
            }
        return cls(method, parameters)

    @classmethod
    def fit_file(cls, method: str, path: Path) -> StainNormalizer:
        from PIL import Image

        try:
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))
        except OSError as error:
            raise BadInputError(f"{path}: failed to read the stain target image ({error})") from error
        if _stained_fraction(rgb) < MIN_STAINED_FRACTION:
            raise BadInputError(f"{path}: the stain target is almost blank; choose an image that is mostly H&E tissue")
        normalizer = cls.fit(method, rgb)
        normalizer.parameters["target"] = Path(path).name
        return normalizer

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **self.parameters}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StainNormalizer:
        parameters = {key: value for key, value in data.items() if key != "method"}
        return cls(data["method"], parameters)

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """Return ``rgb`` in the target's colours; nearly blank or degenerate images come back unchanged."""
        if _stained_fraction(rgb) < MIN_STAINED_FRACTION:
            return rgb
        try:
            if self.method == "macenko":
                normalized, _, _ = self._normalizer.normalize(np.ascontiguousarray(rgb), stains=False)
            else:
                normalized = self._normalizer.normalize(np.ascontiguousarray(rgb))
        except (np.linalg.LinAlgError, ValueError, IndexError) as error:
            log.debug("stain normalization skipped on a %s image: %s", rgb.shape, error)
            return rgb
        if not np.isfinite(normalized).all():
            return rgb
        return np.asarray(normalized, dtype=np.uint8)


def _stained_fraction(rgb: np.ndarray) -> float:
    density = -np.log((rgb.astype(np.float32) + 1) / 240.0)
    return float((density >= BACKGROUND_DENSITY).all(axis=-1).mean()) if rgb.size else 0.0
