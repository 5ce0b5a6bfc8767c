"""Plain images (PNG, JPEG and others that Pillow reads) used as a one-level slide.

Meant for small RGB regions such as BCSS regions of interest: the image is decoded into memory
when opened. Such files carry no trustworthy resolution, so the caller must give ``mpp``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from bcseg.errors import BadInputError
from pipeline.slide.base import Slide, composite_on_white
from pipeline.slide.resolution import resolve_mpp

log = logging.getLogger(__name__)

# Pillow modes that convert to RGB without losing colour; grayscale and 16-bit modes are rejected.
RGB_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr")


class ImageBackend(Slide):
    """A plain image as a slide with one level; ``mpp`` is required."""

    def __init__(self, path: str | Path, mpp: float | None = None, fill_bad_tiles: bool = False) -> None:
        self.path = Path(path)
        self._mpp_override = mpp
        # The whole image decodes when opened, so a damaged file fails there and nothing is filled.
        self.fill_bad_tiles = fill_bad_tiles
        self._pixels = _load_rgb(self.path)

        height, width = self._pixels.shape[:2]
        self.backend = "image"
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        self.vendor = "image"
        self.properties = {}
        self.associated_image_names = ()
        # Pixel-density fields of PNG and JPEG are screen or print settings, not scan resolution.
        self.mpp, self.mpp_source = resolve_mpp(self.path, mpp, None)

    def read_level_region(self, level: int, lv_x: int, lv_y: int, lv_width: int, lv_height: int) -> np.ndarray:
        if level != 0:
            raise ValueError(f"level {level} does not exist; {self.path} has only level 0")
        if lv_width <= 0 or lv_height <= 0:
            raise ValueError(f"region size must be positive, got {lv_width} x {lv_height}")

        region = np.full((lv_height, lv_width, 3), 255, dtype=np.uint8)
        width, height = self.level_dimensions[0]
        lv_x0, lv_y0 = max(lv_x, 0), max(lv_y, 0)
        lv_x1, lv_y1 = min(lv_x + lv_width, width), min(lv_y + lv_height, height)
        if lv_x0 < lv_x1 and lv_y0 < lv_y1:
            region[lv_y0 - lv_y : lv_y1 - lv_y, lv_x0 - lv_x : lv_x1 - lv_x] = self._pixels[lv_y0:lv_y1, lv_x0:lv_x1]
        return region

    def __reduce__(self):
        return (type(self), (self.path, self._mpp_override, self.fill_bad_tiles))


def _load_rgb(path: Path) -> np.ndarray:
    """Decode ``path`` to RGB uint8 (rows, cols, 3), transparent pixels composited on white."""
    try:
        with Image.open(path) as image:
            if image.mode not in RGB_MODES:
                raise BadInputError(
                    f"{path}: image mode {image.mode} is not RGB; grayscale, 16-bit and label images "
                    "are not supported, only brightfield RGB"
                )
            if getattr(image, "n_frames", 1) > 1:
                log.warning("%s has %d frames; reading only the first", path, image.n_frames)
            has_alpha = image.mode in ("RGBA", "PA") or (image.mode == "P" and "transparency" in image.info)
            image.load()
            if has_alpha:
                return composite_on_white(np.asarray(image.convert("RGBA")), premultiplied=False)
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as error:
        raise BadInputError(
            f"{path}: the image is too large to decode in memory ({error}); convert it to a tiled "
            "pyramidal TIFF"
        ) from error
    except (Image.UnidentifiedImageError, OSError) as error:
        raise BadInputError(f"{path}: Pillow cannot read this image ({error})") from error
