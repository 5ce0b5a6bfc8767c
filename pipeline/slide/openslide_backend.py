"""Slides read with OpenSlide: Aperio, Hamamatsu, Leica, MIRAX, Philips, Sakura, Ventana, Zeiss,
DICOM and tiled generic TIFF."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import openslide

from bcseg.errors import BadInputError
from pipeline.slide.base import Slide, composite_on_white, consistent_levels, tile_decode_error
from pipeline.slide.resolution import MetadataResolution, mpp_from_tiff_resolution, resolve_mpp

log = logging.getLogger(__name__)

# openslide's spelling of the TIFF ResolutionUnit values that carry a length.
TIFF_UNIT_CODES = {"inch": 2, "centimeter": 3}


# On a level whose downsample is not an integer, openslide starts a read at the level-0 location
# divided by the downsample, which is a fractional level position, and interpolates. Pixels come
# out shifted by up to a quarter pixel, by an amount that depends on where the read starts. Such
# levels are therefore read in blocks of this many level pixels on a fixed grid. Each pixel's
# value then depends only on its place, so reading a region in pieces equals reading it whole.
GRID_BLOCK_SIZE = 256


class OpenSlideBackend(Slide):
    """A slide opened with openslide-python.

    ``path`` is a slide file, or a folder holding the ``.dcm`` files of one DICOM slide.
    ``mpp`` overrides the resolution in the metadata (see ``pipeline.slide.resolution``).
    """

    def __init__(self, path: str | Path, mpp: float | None = None, fill_bad_tiles: bool = False) -> None:
        self.path = Path(path)
        self._mpp_override = mpp
        self.fill_bad_tiles = fill_bad_tiles
        self._osr = _open(self.path)
        self._reopen_lock = threading.Lock()

        self.backend = "openslide"
        # Our level i is OpenSlide's level self._openslide_levels[i].
        openslide_dimensions = tuple(tuple(size) for size in self._osr.level_dimensions)
        self._openslide_levels = consistent_levels(openslide_dimensions)
        if len(self._openslide_levels) < len(openslide_dimensions):
            log.warning(
                "%s: ignoring pyramid levels whose aspect ratio differs from level 0 (a thumbnail or "
                "label stored as a level): %s",
                self.path, [openslide_dimensions[i] for i in range(len(openslide_dimensions)) if i not in self._openslide_levels],
            )
        self.level_dimensions = tuple(openslide_dimensions[i] for i in self._openslide_levels)
        self.level_downsamples = tuple(float(self._osr.level_downsamples[i]) for i in self._openslide_levels)
        self.properties = _readable_properties(self.path, self._osr)
        self.vendor = self.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self.associated_image_names = tuple(sorted(self._osr.associated_images))
        try:
            self.mpp, self.mpp_source = resolve_mpp(self.path, mpp, _metadata_resolution(self.properties))
        except BadInputError:
            self._osr.close()
            raise

    def read_level_region(self, level: int, lv_x: int, lv_y: int, lv_width: int, lv_height: int) -> np.ndarray:
        # Only the part inside the level is read; the rest stays white. This also keeps negative
        # locations away from openslide, which shifts them by one pixel on levels whose
        # downsample is not an integer (seen with openslide 4.0.1).
        region, inside = self._white_canvas_and_inside(level, lv_x, lv_y, lv_width, lv_height)
        if inside is None:
            return region
        lv_x0, lv_y0, lv_x1, lv_y1 = inside

        decode = lambda x0, y0, x1, y1: self._read_inside(level, x0, y0, x1, y1)  # noqa: E731
        pixels = self._decode_or_fill(level, inside, self._tile_size(level), decode)
        region[lv_y0 - lv_y : lv_y1 - lv_y, lv_x0 - lv_x : lv_x1 - lv_x] = pixels
        return region

    def _read_inside(self, level: int, lv_x0: int, lv_y0: int, lv_x1: int, lv_y1: int) -> np.ndarray:
        """Read level pixels ``[lv_x0, lv_x1) x [lv_y0, lv_y1)``, all inside the level, as RGB."""
        if float(self.level_downsamples[level]).is_integer():
            blocks = [(lv_x0, lv_y0, lv_x1, lv_y1)]
        else:
            blocks = _grid_blocks(lv_x0, lv_y0, lv_x1, lv_y1, GRID_BLOCK_SIZE)
        pixels = np.empty((lv_y1 - lv_y0, lv_x1 - lv_x0, 3), dtype=np.uint8)
        for block_x0, block_y0, block_x1, block_y1 in blocks:
            # A block must start on the grid but may stop where the request stops.
            x1, y1 = min(block_x1, lv_x1), min(block_y1, lv_y1)
            block = self._read_block(level, block_x0, block_y0, x1 - block_x0, y1 - block_y0)
            x0, y0 = max(block_x0, lv_x0), max(block_y0, lv_y0)
            pixels[y0 - lv_y0 : y1 - lv_y0, x0 - lv_x0 : x1 - lv_x0] = block[y0 - block_y0 :, x0 - block_x0 :]
        return pixels

    def _read_block(self, level: int, lv_x: int, lv_y: int, lv_width: int, lv_height: int) -> np.ndarray:
        # openslide takes the location in level-0 pixels and the size in level pixels.
        downsample = self.level_downsamples[level]
        l0_location = (round(lv_x * downsample), round(lv_y * downsample))
        openslide_level = self._openslide_levels[level]
        osr = self._osr
        try:
            region = osr.read_region(l0_location, openslide_level, (lv_width, lv_height))
        except openslide.OpenSlideError:
            # After an error an OpenSlide handle fails every later call, in every thread, so the
            # shared handle is replaced. The read is retried on a private handle, because the
            # error may have come from another thread's read.
            with self._reopen_lock:
                if self._osr is osr:
                    self._osr = _open(self.path)
            private = _open(self.path)
            try:
                region = private.read_region(l0_location, openslide_level, (lv_width, lv_height))
            except openslide.OpenSlideError as error:
                raise tile_decode_error(self, level, (lv_x, lv_y, lv_x + lv_width, lv_y + lv_height), error) from error
            finally:
                private.close()
        # openslide-python returns non-premultiplied RGBA, transparent where nothing was scanned.
        return composite_on_white(np.asarray(region), premultiplied=False)

    def _tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of the level's stored tiles, from OpenSlide's properties, else 256 x 256."""
        openslide_level = self._openslide_levels[level]
        width = _float_or_none(self.properties.get(f"openslide.level[{openslide_level}].tile-width"))
        height = _float_or_none(self.properties.get(f"openslide.level[{openslide_level}].tile-height"))
        return (int(width or 256), int(height or 256))

    def close(self) -> None:
        self._osr.close()

    def __reduce__(self):
        # Reopen by path in another process (dask workers), instead of pickling the C handle.
        return (type(self), (self.path, self._mpp_override, self.fill_bad_tiles))


def _readable_properties(path: Path, osr: openslide.OpenSlide) -> dict[str, str]:
    """Copy OpenSlide's properties, skipping names that do not survive decoding as UTF-8.

    openslide-python decodes a damaged name with replacement characters and then cannot look
    it up (KeyError), so ``dict(osr.properties)`` fails on such a file.
    """
    properties = {}
    for name in osr.properties:
        try:
            properties[name] = osr.properties[name]
        except KeyError:
            log.warning("%s: ignoring a slide property whose name is not valid UTF-8: %r", path, name)
    return properties


def _grid_blocks(lv_x0: int, lv_y0: int, lv_x1: int, lv_y1: int, size: int) -> list[tuple[int, int, int, int]]:
    """Blocks ``(x0, y0, x1, y1)`` of the fixed ``size`` grid that cover the given box."""
    return [
        (block_x, block_y, block_x + size, block_y + size)
        for block_y in range(lv_y0 // size * size, lv_y1, size)
        for block_x in range(lv_x0 // size * size, lv_x1, size)
    ]


def _open(path: Path) -> openslide.OpenSlide:
    """Open ``path`` with OpenSlide, or raise BadInputError saying why it cannot be read."""
    file_path = dicom_member(path) if path.is_dir() else path
    try:
        return openslide.OpenSlide(file_path)
    except openslide.OpenSlideUnsupportedFormatError as error:
        raise BadInputError(f"{path}: OpenSlide does not recognize this file as a slide") from error
    except openslide.OpenSlideError as error:
        raise BadInputError(f"{path}: OpenSlide cannot open this slide: {error}") from error


def dicom_member(folder: Path) -> Path:
    """Return a ``.dcm`` file of the DICOM slide in ``folder``; OpenSlide finds the others itself.

    Raises BadInputError when the folder contains no DICOM file that OpenSlide recognizes.
    """
    for member in sorted(folder.iterdir()):
        if member.suffix.lower() == ".dcm" and member.is_file() and openslide.OpenSlide.detect_format(member) == "dicom":
            return member
    raise BadInputError(
        f"{folder} is a folder but not a DICOM slide: it contains no .dcm file that OpenSlide "
        "recognizes. Pass a slide file, or a folder with the .dcm files of one DICOM slide"
    )


def _metadata_resolution(properties: dict[str, str]) -> MetadataResolution | None:
    # For generic TIFF, apply the same placeholder rules to the resolution tags as the tifffile
    # backend does, instead of openslide's mpp, which turns "1 pixel per centimeter" into 10000.
    if properties.get(openslide.PROPERTY_NAME_VENDOR) == "generic-tiff":
        return mpp_from_tiff_resolution(
            _float_or_none(properties.get("tiff.XResolution")),
            _float_or_none(properties.get("tiff.YResolution")),
            TIFF_UNIT_CODES.get(properties.get("tiff.ResolutionUnit", "")),
        )

    mpp_x = _float_or_none(properties.get(openslide.PROPERTY_NAME_MPP_X))
    mpp_y = _float_or_none(properties.get(openslide.PROPERTY_NAME_MPP_Y))
    if mpp_x is None or mpp_y is None:
        return None
    return MetadataResolution(mpp_x, mpp_y, openslide.PROPERTY_NAME_MPP_X)


def _float_or_none(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None
