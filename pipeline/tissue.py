"""Tissue detection on a low-resolution view of a slide.

Method, on the whole slide resampled to ``tissue_mpp`` (8 microns per pixel, or coarser so the
long side stays within 4096 pixels, and never finer than the slide):

1. Convert to HSV. Stained tissue is saturated (eosin pink, hematoxylin purple) and glass is
   white, so a pixel is tissue when its saturation or its darkness (255 - value) is above an
   Otsu threshold. Each threshold is clamped to a range: the floor keeps a blank slide empty
   when Otsu splits nothing but noise, the ceiling keeps a slide that is all tissue whole when
   Otsu splits tissue into pale and dark parts.
2. Near-black pixels (scanner borders, black background) are never tissue, and a view without
   contrast (blank, white, black or one uniform colour) has no tissue at all.
3. Clean-up: a 3 x 3 opening removes thin lines and specks, objects smaller than
   ``MIN_OBJECT_UM2`` are dropped, and holes smaller than ``MAX_HOLE_UM2`` are filled. Larger
   holes (lumens, fat, tears) stay out, so their glass is not reported as tissue area.

Not handled: pen marks and coloured debris are saturated, so they count as tissue. Very pale
tissue (fat, loose stroma far from stained tissue) can be missed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.slide.base import Slide

log = logging.getLogger(__name__)

MIN_TISSUE_MPP = 8.0
MAX_VIEW_SIDE_PX = 4096

# Threshold ranges on 0-255 HSV channels, chosen on H&E slides at 8 microns per pixel (CMU-1 and
# TCGA BCSS regions). There glass has saturation below 10 and darkness below 15, and tissue has
# saturation from about 40 up.
SATURATION_THRESHOLD_RANGE = (20, 40)
DARKNESS_THRESHOLD_RANGE = (50, 80)
# Pixels with HSV value below this are black background, not tissue.
MIN_TISSUE_VALUE = 30
# A view where fewer pixels than one smallest object (MIN_OBJECT_UM2) differ from the median by
# this much, in saturation and in darkness, is blank or uniform.
MIN_CONTRAST = 10
MIN_OBJECT_UM2 = 10_000.0  # 0.01 mm2, a square of 100 microns
MAX_HOLE_UM2 = 100_000.0  # 0.1 mm2


@dataclass
class TissueMask:
    """A boolean tissue mask of the whole slide, ``mask[row, col]`` at ``mpp`` microns per pixel.

    Pixel ``(row, col)`` covers ``[col * mpp, (col + 1) * mpp)`` microns in x from the slide's
    top-left corner, and the same in y, as in ``Slide.read_region_at_mpp``.
    """

    mask: np.ndarray
    mpp: float

    @classmethod
    def full(cls, slide: Slide, mpp: float | None = None) -> TissueMask:
        """Make a mask that marks the whole slide as tissue, for when detection is turned off."""
        mpp = tissue_mpp(slide) if mpp is None else mpp
        width, height = slide.size_at_mpp(mpp)
        return cls(np.ones((height, width), dtype=bool), mpp)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of mask pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def area_um2(self) -> float:
        """Tissue area in square microns."""
        return float(np.count_nonzero(self.mask)) * self.mpp * self.mpp

    def covers(self, m_x: float, m_y: float, m_width: float, m_height: float, m_mpp: float) -> bool:
        """Tell whether a box touches any tissue pixel.

        The box is ``[m_x, m_x + m_width) x [m_y, m_y + m_height)`` in pixels at ``m_mpp``
        microns per pixel. A box that only meets a tissue pixel at its edge does not touch it.
        """
        if m_width <= 0 or m_height <= 0:
            return False
        scale = m_mpp / self.mpp
        rows, cols = self.mask.shape
        # A mask pixel touches the box when their open intervals overlap. The epsilon keeps a box
        # that ends exactly on a pixel edge from reaching into the next pixel.
        col0 = max(0, math.floor(m_x * scale + 1e-9))
        row0 = max(0, math.floor(m_y * scale + 1e-9))
        col1 = min(cols, math.ceil((m_x + m_width) * scale - 1e-9))
        row1 = min(rows, math.ceil((m_y + m_height) * scale - 1e-9))
        if col0 >= col1 or row0 >= row1:
            return False
        return bool(self.mask[row0:row1, col0:col1].any())

    def resized_to(self, width: int, height: int) -> np.ndarray:
        """Stretch the mask to ``(width, height)`` by nearest neighbour; returns bool (height, width).

        Each output pixel takes the mask pixel under its centre, so a label map of the whole
        slide at another resolution can be masked with it.
        """
        rows, cols = self.mask.shape
        row_index = np.minimum(((np.arange(height) + 0.5) * rows / height).astype(np.intp), rows - 1)
        col_index = np.minimum(((np.arange(width) + 0.5) * cols / width).astype(np.intp), cols - 1)
        return self.mask[row_index[:, None], col_index[None, :]]


def tissue_mpp(slide: Slide) -> float:
    """Resolution of the view tissue is detected on: 8 microns per pixel, or coarser for a large
    slide so the long side stays within 4096 pixels, and never finer than the slide itself."""
    l0_width, l0_height = slide.dimensions
    long_side_um = max(l0_width, l0_height) * slide.mpp
    return max(MIN_TISSUE_MPP, long_side_um / MAX_VIEW_SIDE_PX, slide.mpp)


def detect_tissue(slide: Slide, mpp: float | None = None) -> TissueMask:
    """Detect tissue on a low-resolution view of ``slide`` (see the module docstring).

    ``mpp`` sets the view's resolution; None uses ``tissue_mpp(slide)``.
    """
    mpp = tissue_mpp(slide) if mpp is None else mpp
    width, height = slide.size_at_mpp(mpp)
    view = slide.read_region_at_mpp(0, 0, width, height, mpp)
    mask = tissue_mask_from_rgb(view, mpp)
    result = TissueMask(mask, mpp)
    log.info("%s: tissue covers %.1f%% of the slide (mask %d x %d at %g mpp)", slide.path, 100 * result.tissue_fraction, width, height, mpp)
    return result


def tissue_mask_from_rgb(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Detect tissue in an RGB uint8 image (rows, cols, 3) at ``mpp``; returns bool (rows, cols)."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    saturation = hsv[..., 1]
    value = hsv[..., 2]
    darkness = 255 - value

    # A blank or uniform view has nothing to separate. Counting the pixels that stand out, rather
    # than taking percentiles, keeps a small piece of tissue on a large slide.
    pixel_area_um2 = mpp * mpp
    min_object_pixels = MIN_OBJECT_UM2 / pixel_area_um2
    if _contrast_pixels(saturation) < min_object_pixels and _contrast_pixels(darkness) < min_object_pixels:
        log.debug("tissue detection: no contrast in the view; no tissue")
        return np.zeros(saturation.shape, dtype=bool)

    # Saturated or dark pixels, but not black ones.
    saturation_threshold = _clamped_otsu(saturation, SATURATION_THRESHOLD_RANGE)
    darkness_threshold = _clamped_otsu(darkness, DARKNESS_THRESHOLD_RANGE)
    candidate = ((saturation > saturation_threshold) | (darkness > darkness_threshold)) & (value >= MIN_TISSUE_VALUE)
    log.debug("tissue detection: saturation > %d or darkness > %d", saturation_threshold, darkness_threshold)

    # Clean-up: thin lines and specks, small objects, small holes.
    candidate = cv2.morphologyEx(candidate.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    mask = _remove_small_objects(candidate.astype(bool), min_object_pixels)
    return _fill_small_holes(mask, MAX_HOLE_UM2 / pixel_area_um2)


def write_tissue_png(mask: TissueMask, path: str | Path) -> None:
    """Write the mask as an 8-bit PNG, tissue 255 and the rest 0, its resolution in the PNG's
    pixel density (pixels per inch = 25400 / mpp)."""
    pixels_per_inch = 25_400.0 / mask.mpp
    image = Image.fromarray(mask.mask.astype(np.uint8) * 255, mode="L")
    image.save(path, format="PNG", dpi=(pixels_per_inch, pixels_per_inch))


def _contrast_pixels(channel: np.ndarray) -> int:
    """Count the pixels of a uint8 channel that differ from its median by MIN_CONTRAST or more."""
    histogram = np.bincount(channel.ravel(), minlength=256)
    median = int(np.searchsorted(np.cumsum(histogram), (channel.size + 1) // 2))
    low, high = max(0, median - MIN_CONTRAST + 1), min(256, median + MIN_CONTRAST)
    return int(channel.size - histogram[low:high].sum())


def _clamped_otsu(channel: np.ndarray, threshold_range: tuple[int, int]) -> int:
    threshold, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    low, high = threshold_range
    return int(min(max(threshold, low), high))


def _remove_small_objects(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
    keep[0] = False  # label 0 is the background
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    # Holes are background components (4-connected, the dual of 8-connected objects) that do not
    # touch the image border.
    count, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = stats[:, cv2.CC_STAT_AREA] < max_pixels
    fill[0] = False  # label 0 is the tissue itself
    fill[border_labels] = False
    return mask | fill[labels]
