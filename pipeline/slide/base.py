"""The reader interface every slide backend implements, and reading at a target resolution.

Frames: ``l0_`` is level-0 pixels of the slide, ``lv_`` pixels of one pyramid level, and pixels
"at mpp" are pixels of a virtual image of the whole slide resampled to that resolution, whose pixel
``(row, col)`` covers level-0 ``[col * s, (col + 1) * s)`` in x (same for y) with
``s = mpp / slide.mpp``. Positions are ``(x, y)``; arrays are ``(row, col)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np

# A level whose downsample exceeds the needed one by at most this fraction still serves it, so a
# level at 4.00015 is used for a target of 4.0.
LEVEL_TOLERANCE = 1e-3
# Level pixels read in one piece by read_region_at_mpp; larger requests are done in row bands.
# A band's float32 smoothing buffers take about 12 bytes per level pixel, so 1024 x 1024 keeps
# them near 12 MB. At 4096 x 4096 the tissue view of a 100,000 x 80,000 px slide took 900 MB.
MAX_READ_PIXELS = 1024 * 1024


class Slide(ABC):
    """An open slide: pyramid levels, base resolution and pixel access.

    Subclasses set the attributes in ``__init__`` and implement ``read_level_region``.
    """

    path: Path
    backend: str  # "openslide", "tifffile" or "image"
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) of each level
    level_downsamples: tuple[float, ...]  # level-0 pixels per level pixel
    mpp: float  # microns per level-0 pixel
    mpp_source: str  # where mpp came from, e.g. "openslide.mpp-x" or "--mpp"
    vendor: str
    properties: dict[str, str]
    associated_image_names: tuple[str, ...]

    @abstractmethod
    def read_level_region(self, level: int, lv_x: int, lv_y: int, lv_width: int, lv_height: int) -> np.ndarray:
        """Read level pixels ``[lv_x, lv_x + lv_width) x [lv_y, lv_y + lv_height)``.

        Returns RGB uint8 of shape (lv_height, lv_width, 3). Transparent pixels are composited on
        white and the area outside the level is white.
        """

    def _white_canvas_and_inside(
        self, level: int, lv_x: int, lv_y: int, lv_width: int, lv_height: int
    ) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
        """Check a request for level pixels; return a white canvas of its size and the part inside.

        The part is (lv_x0, lv_y0, lv_x1, lv_y1) in level pixels, or None when the request lies
        wholly outside the level.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} does not exist; {self.path} has levels 0 to {self.level_count - 1}")
        if lv_width <= 0 or lv_height <= 0:
            raise ValueError(f"region size must be positive, got {lv_width} x {lv_height}")
        canvas = np.full((lv_height, lv_width, 3), 255, dtype=np.uint8)
        level_width, level_height = self.level_dimensions[level]
        lv_x0, lv_y0 = max(lv_x, 0), max(lv_y, 0)
        lv_x1, lv_y1 = min(lv_x + lv_width, level_width), min(lv_y + lv_height, level_height)
        if lv_x0 >= lv_x1 or lv_y0 >= lv_y1:
            return canvas, None
        return canvas, (lv_x0, lv_y0, lv_x1, lv_y1)

    def close(self) -> None:
        """Release file handles; the default has none."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def size_at_mpp(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the whole slide resampled to ``mpp``, rounded up."""
        l0_per_px = mpp / self.mpp
        l0_width, l0_height = self.dimensions
        return math.ceil(l0_width / l0_per_px - 1e-9), math.ceil(l0_height / l0_per_px - 1e-9)

    def best_level_for_downsample(self, downsample: float) -> int:
        """Return the coarsest level at or finer than ``downsample`` (level-0 pixels per pixel)."""
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= downsample * (1 + LEVEL_TOLERANCE) and level_downsample >= self.level_downsamples[best]:
                best = level
        return best

    def read_region_at_mpp(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """Read a region of the slide resampled to ``mpp`` microns per pixel.

        ``(x, y)`` and ``(width, height)`` are in pixels at ``mpp`` (see the module docstring).
        The pixels come from the coarsest level at or finer than ``mpp``, smoothed against
        aliasing and resampled. Each output pixel depends only on its place in the slide, so
        reading a region in pieces equals reading it whole. Returns RGB uint8 (height, width, 3).
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {width} x {height}")
        l0_per_px = mpp / self.mpp
        level = self.best_level_for_downsample(l0_per_px)
        lv_per_px = l0_per_px / self.level_downsamples[level]

        # Large requests run in row bands so memory stays bounded; bands meet exactly.
        band_rows = max(1, int(MAX_READ_PIXELS / max(1.0, width * lv_per_px * lv_per_px)))
        if band_rows >= height:
            return _resample_from_level(self, level, lv_per_px, x, y, width, height)
        bands = [
            _resample_from_level(self, level, lv_per_px, x, y + row, width, min(band_rows, height - row))
            for row in range(0, height, band_rows)
        ]
        return np.concatenate(bands, axis=0)


def composite_on_white(rgba: np.ndarray, premultiplied: bool) -> np.ndarray:
    """Composite RGBA uint8 pixels (rows, cols, 4) on a white background; returns RGB uint8.

    ``premultiplied`` is True when colour values are already multiplied by alpha (TIFF
    "associated alpha") and False when not (openslide-python's and PIL's RGBA, TIFF
    "unassociated alpha").
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if np.all(alpha == 255):
        return np.ascontiguousarray(rgb)
    rgb = rgb.astype(np.uint32)
    alpha = alpha.astype(np.uint32)
    if premultiplied:
        white_part = 255 - alpha
        return np.minimum(rgb + white_part, 255).astype(np.uint8)
    # (rgb * alpha + 255 * (255 - alpha)) / 255, rounded to nearest.
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _resample_from_level(slide: Slide, level: int, lv_per_px: float, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Resample one region from ``level``, where one output pixel spans ``lv_per_px`` level pixels."""
    # Exact cases: same grid (a crop), or an integer box of level pixels per output pixel.
    factor = round(lv_per_px)
    if factor >= 1 and abs(lv_per_px - factor) < 1e-9:
        pixels = slide.read_level_region(level, x * factor, y * factor, width * factor, height * factor)
        if factor == 1:
            return pixels
        boxes = pixels.reshape(height, factor, width, factor, 3).astype(np.float32)
        return np.round(boxes.mean(axis=(1, 3))).astype(np.uint8)

    # General case: Gaussian smoothing against aliasing when shrinking, then bilinear sampling at
    # each output pixel's centre. The margin covers the smoothing kernel and the interpolation.
    sigma = max(0.0, (lv_per_px - 1.0) / 2.0)
    margin = int(math.ceil(3 * sigma)) + 2
    lv_x0 = math.floor(x * lv_per_px) - margin
    lv_y0 = math.floor(y * lv_per_px) - margin
    lv_x1 = math.ceil((x + width) * lv_per_px) + margin
    lv_y1 = math.ceil((y + height) * lv_per_px) + margin
    pixels = slide.read_level_region(level, lv_x0, lv_y0, lv_x1 - lv_x0, lv_y1 - lv_y0)
    if sigma > 0.1:
        pixels = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), sigmaX=sigma, sigmaY=sigma)

    # Output pixel centre (col + 0.5) maps to level coordinate (x + col + 0.5) * lv_per_px, whose
    # index in ``pixels`` (centres at integers) is that minus 0.5 minus lv_x0.
    transform = np.array(
        [
            [lv_per_px, 0.0, (x + 0.5) * lv_per_px - 0.5 - lv_x0],
            [0.0, lv_per_px, (y + 0.5) * lv_per_px - 0.5 - lv_y0],
        ]
    )
    resampled = cv2.warpAffine(
        pixels,
        transform,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if resampled.dtype != np.uint8:
        resampled = np.clip(np.round(resampled), 0, 255).astype(np.uint8)
    return resampled
