"""The reader interface every slide backend implements, and reading at a target resolution.

Frames: ``l0_`` is level-0 pixels of the slide, ``lv_`` pixels of one pyramid level, and pixels
"at mpp" are pixels of a virtual image of the whole slide resampled to that resolution, whose pixel
``(row, col)`` covers level-0 ``[col * s, (col + 1) * s)`` in x (same for y) with
``s = mpp / slide.mpp``. Positions are ``(x, y)``; arrays are ``(row, col)``.
"""

from __future__ import annotations

import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from bcseg.errors import TileDecodeError

log = logging.getLogger(__name__)

# A level whose downsample exceeds the needed one by at most this fraction still serves it, so a
# level at 4.00015 is used for a target of 4.0.
LEVEL_TOLERANCE = 1e-3
# Level pixels read in one piece by read_region_at_mpp; larger requests are done in row bands.
# A band's float32 smoothing buffers take about 12 bytes per level pixel, so 1024 x 1024 keeps
# them near 12 MB. At 4096 x 4096 the tissue view of a 100,000 x 80,000 px slide took 900 MB.
MAX_READ_PIXELS = 1024 * 1024
# From this many level pixels per output pixel on, read_region_at_mpp first averages boxes of whole
# level pixels. A large reduction (a slide without a coarse level) then avoids Gaussian smoothing
# of every level pixel in float32, which is many times slower.
MIN_BOX_REDUCTION = 3.0


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
    # False: a tile that fails to decode raises TileDecodeError. True: it reads as white
    # background and is listed in ``bad_tiles``.
    fill_bad_tiles: bool = False
    _bad_tile_lock = threading.Lock()

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

    @property
    def bad_tiles(self) -> list[tuple[int, int, int, int]]:
        """Tiles filled as background because they failed to decode: sorted level-0 (x, y, width, height)."""
        with self._bad_tile_lock:
            return sorted(self.__dict__.get("_bad_tiles", ()))

    def _decode_or_fill(
        self,
        level: int,
        lv_box: tuple[int, int, int, int],
        tile_size: tuple[int, int],
        decode: Callable[[int, int, int, int], np.ndarray],
    ) -> np.ndarray:
        """Decode level pixels ``lv_box = (x0, y0, x1, y1)`` with ``decode(x0, y0, x1, y1)``.

        When that raises TileDecodeError, the box is decoded again one stored tile of
        ``tile_size = (width, height)`` level pixels at a time. Without ``fill_bad_tiles`` the
        first tile that fails raises, so the message gives that tile's place. With it, each tile
        that fails reads as white and is recorded in ``bad_tiles``.
        """
        try:
            return decode(*lv_box)
        except TileDecodeError as error:
            box_error = error

        lv_x0, lv_y0, lv_x1, lv_y1 = lv_box
        tile_width, tile_height = tile_size
        pixels = np.full((lv_y1 - lv_y0, lv_x1 - lv_x0, 3), 255, dtype=np.uint8)
        for tile_y in range(lv_y0 // tile_height * tile_height, lv_y1, tile_height):
            for tile_x in range(lv_x0 // tile_width * tile_width, lv_x1, tile_width):
                x0, y0 = max(tile_x, lv_x0), max(tile_y, lv_y0)
                x1, y1 = min(tile_x + tile_width, lv_x1), min(tile_y + tile_height, lv_y1)
                try:
                    pixels[y0 - lv_y0 : y1 - lv_y0, x0 - lv_x0 : x1 - lv_x0] = decode(x0, y0, x1, y1)
                except TileDecodeError as error:
                    if not self.fill_bad_tiles:
                        raise
                    self._record_bad_tile(level, tile_x, tile_y, tile_width, tile_height, error)
        if not self.fill_bad_tiles:
            raise box_error  # every tile decodes alone, so report the failed box as it was read
        return pixels

    def _record_bad_tile(self, level: int, lv_x: int, lv_y: int, lv_width: int, lv_height: int, error: Exception) -> None:
        # The recorded box is the tile's part inside the level, in level-0 pixels.
        level_width, level_height = self.level_dimensions[level]
        lv_width, lv_height = min(lv_width, level_width - lv_x), min(lv_height, level_height - lv_y)
        downsample = self.level_downsamples[level]
        l0_box = (round(lv_x * downsample), round(lv_y * downsample), round(lv_width * downsample), round(lv_height * downsample))
        with self._bad_tile_lock:
            bad_tiles = self.__dict__.setdefault("_bad_tiles", set())
            if l0_box in bad_tiles:
                return
            bad_tiles.add(l0_box)
        log.warning(
            "%s: tile at level-0 (x=%d, y=%d), %d x %d px, failed to decode and is filled as background: %s",
            self.path, *l0_box, error.__cause__ or error,
        )

    def is_region_unstored(self, level: int, lv_x: int, lv_y: int, lv_width: int, lv_height: int) -> bool:
        """Tell whether the file stores no pixels for a region of level pixels, so it reads as white.

        Sparse TIFF files leave background tiles out. The default, for backends that cannot tell,
        is False.
        """
        return False

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

    @property
    def l0_bounds(self) -> tuple[int, int, int, int] | None:
        """The scanned area as level-0 (x, y, width, height), from OpenSlide's ``bounds-*``
        properties; None when the slide has none or they are not integers.

        Positions stay in the full level-0 frame whatever the bounds are. The bounds only tell
        where a reader that crops to them (QuPath's OpenSlide reader, by default) puts its origin.
        """
        try:
            bounds = tuple(int(self.properties[f"openslide.bounds-{name}"]) for name in ("x", "y", "width", "height"))
        except (KeyError, ValueError):
            return None
        return bounds

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


def consistent_levels(level_dimensions: tuple[tuple[int, int], ...]) -> list[int]:
    """Return the indices of the levels that shrink width and height by the same factor.

    A level passes when its width, predicted from level 0 and the level's height ratio, is within
    one pixel plus 1 % of the real width, and the same with the axes swapped. Writers round level
    sizes either way, so an exact ratio is not required. A thumbnail or label image stored as a
    reduced page has another aspect ratio and fails, because reading it as a level would put
    its pixels in the wrong places.
    """
    l0_width, l0_height = level_dimensions[0]
    kept = [0]
    for level, (width, height) in enumerate(level_dimensions[1:], start=1):
        predicted_width = l0_width * height / l0_height
        predicted_height = l0_height * width / l0_width
        if abs(predicted_width - width) <= 1 + 0.01 * width and abs(predicted_height - height) <= 1 + 0.01 * height:
            kept.append(level)
    return kept


def tile_decode_error(slide: Slide, level: int, lv_box: tuple[int, int, int, int], error: Exception) -> TileDecodeError:
    """Make the TileDecodeError for level pixels ``lv_box = (x0, y0, x1, y1)`` that failed to decode."""
    lv_x0, lv_y0, lv_x1, lv_y1 = lv_box
    downsample = slide.level_downsamples[level]
    l0_box = (round(lv_x0 * downsample), round(lv_y0 * downsample), round((lv_x1 - lv_x0) * downsample), round((lv_y1 - lv_y0) * downsample))
    return TileDecodeError(
        f"{slide.path}: pixels at level-0 (x={l0_box[0]}, y={l0_box[1]}), {l0_box[2]} x {l0_box[3]} px, "
        f"read from level {level}, failed to decode: {error}. The slide file is damaged there; re-export or "
        "re-scan it, or pass --fill-bad-tiles to treat tiles that fail to decode as background",
        l0_box,
    )


def composite_on_white(rgba: np.ndarray, premultiplied: bool) -> np.ndarray:
    """Composite RGBA uint8 pixels (rows, cols, 4) on a white background; returns RGB uint8.

    ``premultiplied`` is True when colour values are already multiplied by alpha (TIFF
    "associated alpha") and False when not (openslide-python's and PIL's RGBA, TIFF
    "unassociated alpha").
    """
    rgb = np.ascontiguousarray(rgba[..., :3])
    alpha = np.ascontiguousarray(rgba[..., 3])
    if alpha.min() == 255:
        return rgb
    if alpha.max() == 0:
        return np.full(rgb.shape, 255, dtype=np.uint8)
    # cv2's saturating uint8 arithmetic, because the same sums in uint32 numpy take seconds for
    # the row bands of a large slide.
    alpha = cv2.merge([alpha, alpha, alpha])
    if premultiplied:
        return cv2.add(rgb, cv2.bitwise_not(alpha))
    # rgb * alpha + 255 * (1 - alpha) with alpha in 0-1 is 255 - (255 - rgb) * alpha, and
    # cv2.multiply rounds to nearest. Exact halves cannot occur because 255 is odd.
    return cv2.bitwise_not(cv2.multiply(cv2.bitwise_not(rgb), alpha, scale=1 / 255))


def box_factor(lv_per_px: float) -> int:
    """Level pixels per side of the boxes averaged before resampling; 1 for no box averaging.

    The boxes leave between 1 and 1.34 box pixels per output pixel for the Gaussian resampling.
    """
    if lv_per_px < MIN_BOX_REDUCTION:
        return 1
    return math.floor(lv_per_px)


def _resample_from_level(slide: Slide, level: int, lv_per_px: float, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Resample one region from ``level``, where one output pixel spans ``lv_per_px`` level pixels."""
    # Exact cases: same grid (a crop), or an integer box of level pixels per output pixel.
    factor = round(lv_per_px)
    if factor >= 1 and abs(lv_per_px - factor) < 1e-9:
        if slide.is_region_unstored(level, x * factor, y * factor, width * factor, height * factor):
            return np.full((height, width, 3), 255, dtype=np.uint8)
        pixels = slide.read_level_region(level, x * factor, y * factor, width * factor, height * factor)
        if factor == 1:
            return pixels
        boxes = pixels.reshape(height, factor, width, factor, 3).astype(np.float32)
        return np.round(boxes.mean(axis=(1, 3))).astype(np.uint8)

    # General case. For a large reduction, the level is first averaged in boxes of ``box`` level
    # pixels on a grid anchored at the level's origin. The result acts as a coarser virtual level,
    # whose frame is ``vl_``. Then come Gaussian smoothing against aliasing when shrinking and
    # bilinear sampling at each output pixel's centre. The margin covers the smoothing kernel
    # and the interpolation.
    box = box_factor(lv_per_px)
    vl_per_px = lv_per_px / box
    sigma = max(0.0, (vl_per_px - 1.0) / 2.0)
    margin = int(math.ceil(3 * sigma)) + 2
    vl_x0 = math.floor(x * vl_per_px) - margin
    vl_y0 = math.floor(y * vl_per_px) - margin
    vl_x1 = math.ceil((x + width) * vl_per_px) + margin
    vl_y1 = math.ceil((y + height) * vl_per_px) + margin
    lv_box = (vl_x0 * box, vl_y0 * box, (vl_x1 - vl_x0) * box, (vl_y1 - vl_y0) * box)
    if slide.is_region_unstored(level, *lv_box):
        return np.full((height, width, 3), 255, dtype=np.uint8)
    pixels = slide.read_level_region(level, *lv_box)
    if box > 1:
        pixels = _box_average(pixels, box)
    if sigma > 0.1:
        pixels = cv2.GaussianBlur(pixels.astype(np.float32), (0, 0), sigmaX=sigma, sigmaY=sigma)

    # Output pixel centre (col + 0.5) maps to virtual level coordinate (x + col + 0.5) *
    # vl_per_px, whose index in ``pixels`` (centres at integers) is that minus 0.5 minus vl_x0.
    transform = np.array(
        [
            [vl_per_px, 0.0, (x + 0.5) * vl_per_px - 0.5 - vl_x0],
            [0.0, vl_per_px, (y + 0.5) * vl_per_px - 0.5 - vl_y0],
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


def _box_average(pixels: np.ndarray, box: int) -> np.ndarray:
    """Average RGB uint8 pixels in ``box`` x ``box`` blocks; both sides must be multiples of ``box``."""
    rows, cols = pixels.shape[0] // box, pixels.shape[1] // box
    # cv2's area interpolation with an integer factor is the exact block mean, rounded, and much
    # faster than a float reshape and mean.
    return cv2.resize(pixels, (cols, rows), interpolation=cv2.INTER_AREA)
