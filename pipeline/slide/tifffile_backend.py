"""Slides read with tifffile: OME-TIFF (SubIFD pyramids too), stripped TIFF, and any 8-bit RGB TIFF
pyramid, including Aperio SVS.

Pixels are read through a zarr view of each pyramid level, so a region decodes only the tiles or
strips it touches and a level is never loaded whole.

Not supported, rejected with BadInputError: samples other than 8-bit unsigned, grayscale and
multi-channel (fluorescence) images, several planes (z, time), compressions that tifffile and
imagecodecs cannot decode, and Leica SCN files, whose images sit at offsets in the slide.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import tifffile
import zarr

from bcseg.errors import BadInputError, TileDecodeError
from pipeline.slide.base import Slide, composite_on_white, tile_decode_error
from pipeline.slide.resolution import (
    MetadataResolution,
    mpp_from_aperio_description,
    mpp_from_ome_xml,
    mpp_from_tiff_resolution,
    resolve_mpp,
)

log = logging.getLogger(__name__)

# TIFF ExtraSamples values: 0 unspecified data, 1 associated (premultiplied) alpha, 2 unassociated alpha.
EXTRASAMPLE_ASSOCIATED_ALPHA = 1
EXTRASAMPLE_UNASSOCIATED_ALPHA = 2
# A chunk (tile or strip) larger than this makes every read slow, because each decodes it whole.
LARGE_CHUNK_BYTES = 64 << 20
# Page-0 tags copied into ``properties`` as "tiff.<name>", as openslide names them.
PROPERTY_TAGS = ("ImageDescription", "Make", "Model", "Software", "DateTime", "XResolution", "YResolution", "ResolutionUnit")
# Exceptions a damaged or undecodable tile raises from tifffile, imagecodecs and zarr.
DECODE_ERRORS = (ValueError, RuntimeError, OSError)
# Aperio's JPEG 2000 compression whose codestream stores YCbCr components without the
# multiple-component transform. Aperio's RGB variant is 33005.
APERIO_JP2K_YCBCR = 33003


class TiffFileBackend(Slide):
    """A TIFF slide read with tifffile; the pyramid is ``series[0].levels``.

    ``mpp`` overrides the resolution in the metadata (see ``pipeline.slide.resolution``). Metadata
    is read, in order, from OME PhysicalSizeX/Y, the Aperio ``MPP =`` field, then the TIFF
    XResolution/YResolution tags with their ResolutionUnit.
    """

    def __init__(self, path: str | Path, mpp: float | None = None, fill_bad_tiles: bool = False) -> None:
        self.path = Path(path)
        self._mpp_override = mpp
        self.fill_bad_tiles = fill_bad_tiles
        try:
            self._tiff = tifffile.TiffFile(self.path)
        except tifffile.TiffFileError as error:
            raise BadInputError(f"{self.path}: not a TIFF file that tifffile can read ({error})") from error
        except OSError as error:
            raise BadInputError(f"{self.path}: tifffile cannot open this path ({error.strerror or error})") from error
        try:
            self._open_levels()
            self._read_metadata(mpp)
        except BadInputError:
            self._tiff.close()
            raise
        except Exception as error:
            # tifffile raises many kinds of exception (IndexError, KeyError, ValueError, struct.error)
            # on damaged structures, and none of them is a bug here.
            self._tiff.close()
            raise BadInputError(
                f"{self.path}: the TIFF structure cannot be read ({type(error).__name__}: {error}); the "
                "file is damaged or not a slide"
            ) from error
        except BaseException:
            self._tiff.close()
            raise

    def _open_levels(self) -> None:
        if not self._tiff.series:
            raise BadInputError(f"{self.path}: the TIFF file contains no image; it is truncated or damaged")
        if self._tiff.is_scn:
            # tifffile returns the macro image and each scanned region as separate series, with
            # no offsets, so no single series is the slide in its level-0 frame.
            raise BadInputError(
                f"{self.path} is a Leica SCN slide, whose scanned regions lie at offsets in the slide; "
                "the tifffile backend cannot place them. Open it with the openslide backend, which "
                "open_slide chooses for SCN files by default"
            )
        series = self._tiff.series[0]
        page = series.levels[0].keyframe
        self._alpha_mode = _check_pixel_format(self.path, series, page)

        self._levels = []
        self._axes = []
        self._stored_chunks = []
        self._ycbcr_levels = []
        level_dimensions = []
        for index, level in enumerate(series.levels):
            # Tiles or strips the file leaves out (sparse TIFF) read as white background.
            array = zarr.open_array(series.aszarr(level=index, fillvalue=255), mode="r")
            if array.ndim != len(level.axes):
                raise BadInputError(
                    f"{self.path}: level {index} has shape {array.shape} but axes {level.axes}; "
                    "tifffile cannot map this file's pyramid"
                )
            self._levels.append(array)
            self._axes.append(level.axes)
            self._ycbcr_levels.append(level.keyframe.compression == APERIO_JP2K_YCBCR)
            self._stored_chunks.append(_stored_chunk_map(level, array.shape[level.axes.index("Y")], array.shape[level.axes.index("X")]))
            level_dimensions.append((array.shape[level.axes.index("X")], array.shape[level.axes.index("Y")]))
        self._warn_on_large_chunks()

        self.backend = "tifffile"
        self.level_dimensions = tuple(level_dimensions)
        # Same definition as openslide: the mean of the width and height ratios to level 0.
        l0_width, l0_height = self.level_dimensions[0]
        self.level_downsamples = tuple((l0_width / width + l0_height / height) / 2 for width, height in self.level_dimensions)

    def _read_metadata(self, mpp: float | None) -> None:
        tiff = self._tiff
        page = tiff.series[0].levels[0].keyframe
        description = page.description or ""
        if tiff.is_svs:
            self.vendor = "aperio"
        elif tiff.is_ome:
            self.vendor = "ome"
        else:
            self.vendor = "generic-tiff"

        self.properties = _tiff_properties(page)
        if tiff.is_svs:
            self.properties.update(_aperio_properties(description))
        # SVS stores thumbnail, label and macro as further series. In other TIFF files further
        # series are separate images, not associated ones.
        self.associated_image_names = ()
        if tiff.is_svs:
            self.associated_image_names = tuple(series.name.lower() for series in tiff.series[1:] if series.name)

        found = None
        if tiff.is_ome:
            found = mpp_from_ome_xml(tiff.ome_metadata or "")
        if found is None and tiff.is_svs:
            found = mpp_from_aperio_description(description)
        if found is None:
            found = _tiff_tag_resolution(page)
        self.mpp, self.mpp_source = resolve_mpp(self.path, mpp, found)

    def _warn_on_large_chunks(self) -> None:
        level = self._levels[0]
        chunk_bytes = int(np.prod(level.chunks)) * level.dtype.itemsize
        if chunk_bytes > LARGE_CHUNK_BYTES:
            log.warning(
                "%s stores level 0 in tiles or strips of %d MiB, and every read decodes a whole one, "
                "so reading is slow. A tiled pyramidal TIFF reads much faster",
                self.path,
                chunk_bytes >> 20,
            )

    def is_region_unstored(self, level: int, lv_x: int, lv_y: int, lv_width: int, lv_height: int) -> bool:
        stored = self._stored_chunks[level]
        if stored is None:
            return False
        chunk_map, chunk_height, chunk_width = stored
        level_width, level_height = self.level_dimensions[level]
        lv_x0, lv_y0 = max(lv_x, 0), max(lv_y, 0)
        lv_x1, lv_y1 = min(lv_x + lv_width, level_width), min(lv_y + lv_height, level_height)
        if lv_x0 >= lv_x1 or lv_y0 >= lv_y1:
            return True
        rows = slice(lv_y0 // chunk_height, (lv_y1 - 1) // chunk_height + 1)
        cols = slice(lv_x0 // chunk_width, (lv_x1 - 1) // chunk_width + 1)
        return not chunk_map[rows, cols].any()

    def read_level_region(self, level: int, lv_x: int, lv_y: int, lv_width: int, lv_height: int) -> np.ndarray:
        # Read the part inside the level; the rest stays white, as do tiles the file leaves out.
        region, inside = self._white_canvas_and_inside(level, lv_x, lv_y, lv_width, lv_height)
        if inside is None or self.is_region_unstored(level, lv_x, lv_y, lv_width, lv_height):
            return region
        lv_x0, lv_y0, lv_x1, lv_y1 = inside

        array, axes = self._levels[level], self._axes[level]
        tile_size = (array.chunks[axes.index("X")], array.chunks[axes.index("Y")])
        decode = lambda x0, y0, x1, y1: self._read_inside(level, x0, y0, x1, y1)  # noqa: E731
        pixels = self._decode_or_fill(level, inside, tile_size, decode)
        region[lv_y0 - lv_y : lv_y1 - lv_y, lv_x0 - lv_x : lv_x1 - lv_x] = pixels
        return region

    def _read_inside(self, level: int, lv_x0: int, lv_y0: int, lv_x1: int, lv_y1: int) -> np.ndarray:
        """Read level pixels ``[lv_x0, lv_x1) x [lv_y0, lv_y1)``, all inside the level, as RGB."""
        axes = self._axes[level]
        selection = []
        kept_axes = ""
        for axis in axes:
            if axis == "Y":
                selection.append(slice(lv_y0, lv_y1))
            elif axis == "X":
                selection.append(slice(lv_x0, lv_x1))
            elif axis in "SC":
                selection.append(slice(None))
            else:
                selection.append(0)  # a length-1 axis, checked when opening
                continue
            kept_axes += axis
        try:
            pixels = self._levels[level][tuple(selection)]
        except DECODE_ERRORS as error:
            raise tile_decode_error(self, level, (lv_x0, lv_y0, lv_x1, lv_y1), error) from error

        pixels = np.transpose(pixels, [kept_axes.index(axis) for axis in "YX"] + [i for i, axis in enumerate(kept_axes) if axis in "SC"])
        if self._ycbcr_levels[level]:
            pixels = _rgb_from_ycbcr(pixels)
        if self._alpha_mode is None:
            return pixels[..., :3]
        return composite_on_white(pixels, premultiplied=self._alpha_mode == EXTRASAMPLE_ASSOCIATED_ALPHA)

    def close(self) -> None:
        self._tiff.close()

    def __reduce__(self):
        # Reopen by path in another process (dask workers), instead of pickling the file handle.
        return (type(self), (self.path, self._mpp_override, self.fill_bad_tiles))


def _check_pixel_format(path: Path, series: tifffile.TiffPageSeries, page: tifffile.TiffPage) -> int | None:
    """Raise BadInputError unless the series is one 8-bit RGB(A) plane that can be decoded.

    Returns how to treat a fourth sample: an ExtraSamples alpha value, or None to ignore it.
    """
    if page.compression not in tifffile.TIFF.DECOMPRESSORS:
        raise BadInputError(
            f"{path}: TIFF compression {_enum_name(page.compression)} is not supported by tifffile and "
            "imagecodecs; convert the slide to JPEG, JPEG 2000, LZW, deflate or uncompressed tiles"
        )
    if series.dtype != np.uint8:
        raise BadInputError(
            f"{path}: samples are {series.dtype} ({series.dtype.itemsize * 8}-bit); only 8-bit RGB "
            "brightfield slides are supported"
        )
    if page.photometric not in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
        raise BadInputError(
            f"{path}: photometric interpretation is {_enum_name(page.photometric)} with "
            f"{page.samplesperpixel} samples per pixel, not RGB; grayscale and multi-channel "
            "(fluorescence) images are not supported, only brightfield RGB"
        )

    shape = dict(zip(series.axes, series.shape))
    extra_axes = {axis: size for axis, size in shape.items() if axis not in "YXSC" and size != 1}
    channel_axes = [axis for axis in shape if axis in "SC"]
    if extra_axes or len(channel_axes) != 1 or shape[channel_axes[0]] not in (3, 4):
        raise BadInputError(
            f"{path}: image axes {series.axes} with shape {series.shape} are not a single RGB plane; "
            "only one 2-D RGB image per slide is supported"
        )

    if shape[channel_axes[0]] == 3:
        return None
    extrasamples = tuple(page.extrasamples or ())
    alpha = extrasamples[0] if extrasamples else 0
    if alpha in (EXTRASAMPLE_ASSOCIATED_ALPHA, EXTRASAMPLE_UNASSOCIATED_ALPHA):
        return alpha
    log.info("%s: the fourth sample is not marked as alpha (ExtraSamples %s); ignoring it", path, extrasamples)
    return None


def _rgb_from_ycbcr(pixels: np.ndarray) -> np.ndarray:
    """Convert full-range (JFIF) YCbCr uint8 pixels (rows, cols, 3 or more) to RGB; samples past
    the third are kept.

    NOTE: tifffile 2026.3.3 with imagecodecs 2026.3.6 returns Aperio 33003 tiles as stored, in
    YCbCr. Should a later tifffile convert them itself, the colours come out wrong here and the
    33003 reader test fails.
    """
    ycrcb = np.ascontiguousarray(pixels[..., [0, 2, 1]])
    rgb = cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)
    if pixels.shape[-1] == 3:
        return rgb
    return np.concatenate([rgb, pixels[..., 3:]], axis=-1)


def _stored_chunk_map(level: tifffile.TiffPageSeries, height: int, width: int) -> tuple[np.ndarray, int, int] | None:
    """Map which tiles or strips of a one-page level the file stores: bool (chunk rows, chunk cols).

    Returns the map with the chunk height and width, or None when the level's layout is not one
    page of interleaved samples.
    """
    if len(level.pages) != 1 or level.keyframe.planarconfig != tifffile.PLANARCONFIG.CONTIG:
        return None
    page = level.pages[0]
    chunk_height, chunk_width = page.chunks[0], page.chunks[1]
    chunk_rows, chunk_cols = -(-height // chunk_height), -(-width // chunk_width)
    byte_counts = np.asarray(page.databytecounts)
    if byte_counts.size != chunk_rows * chunk_cols:
        return None
    return byte_counts.reshape(chunk_rows, chunk_cols) > 0, chunk_height, chunk_width


def _tiff_tag_resolution(page: tifffile.TiffPage) -> MetadataResolution | None:
    def tag_value(name: str) -> float | None:
        tag = page.tags.get(name)
        if tag is None:
            return None
        numerator, denominator = tag.value
        return numerator / denominator if denominator else None

    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # the TIFF default unit is the inch
    return mpp_from_tiff_resolution(tag_value("XResolution"), tag_value("YResolution"), unit)


def _tiff_properties(page: tifffile.TiffPage) -> dict[str, str]:
    properties = {}
    for name in PROPERTY_TAGS:
        tag = page.tags.get(name)
        if tag is None:
            continue
        value = tag.value
        if isinstance(value, tuple) and len(value) == 2 and value[1]:
            value = value[0] / value[1]
        properties[f"tiff.{name}"] = _enum_name(value).lower() if name == "ResolutionUnit" else str(value)
    return properties


def _aperio_properties(description: str) -> dict[str, str]:
    """Parse the ``key = value`` fields that follow the first ``|`` of an Aperio ImageDescription."""
    properties = {}
    for field in description.split("|")[1:]:
        key, separator, value = field.partition("=")
        if separator:
            properties[f"aperio.{key.strip()}"] = value.strip()
    return properties


def _enum_name(value) -> str:
    return getattr(value, "name", str(value))
