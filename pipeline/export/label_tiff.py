"""Label map to a pyramidal, tiled, palette-coloured TIFF with its resolution recorded.

The pyramid is stored as top-level reduced-resolution IFDs (NewSubfileType 1), the layout of generic
tiled TIFF pyramids. OpenSlide 4.0.1 reads every level of that layout, but it reads only level 0
when the levels are SubIFDs. tifffile reads both layouts as one series with levels.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tifffile

from bcseg.classes import CLASSES
from pipeline.export import atomic_output

logger = logging.getLogger(__name__)

TILE_PX = 256
MIN_LEVEL_PX = 512  # halving stops at the first level whose longer side is below this
BAND_TILE_ROWS = 4  # tile rows read from the label map at a time
BACKGROUND_COLOR = (0, 0, 0)


def level_shapes(m_rows: int, m_cols: int) -> list[tuple[int, int]]:
    """(rows, cols) of each pyramid level: level k keeps every 2**k-th pixel of level 0."""
    shapes = [(m_rows, m_cols)]
    while max(shapes[-1]) >= MIN_LEVEL_PX:
        rows, cols = shapes[-1]
        shapes.append(((rows + 1) // 2, (cols + 1) // 2))
    return shapes


def palette_colormap() -> np.ndarray:
    """TIFF colormap, (3, 256) uint16: 0 black, labels 1..5 the class colours, the rest black."""
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, 0] = BACKGROUND_COLOR
    for tissue_class in CLASSES:
        colormap[:, tissue_class.label] = tissue_class.color
    return colormap * 257  # 8-bit to 16-bit: 255 becomes 65535


def write_label_tiff(path: str | os.PathLike, labels, mpp: float) -> dict[str, Any]:
    """Write ``labels`` (rows, cols, values 0..255) as a deflate-compressed tiled TIFF pyramid.

    Levels halve by nearest neighbour (every 2nd pixel), so they hold only real label values.
    Each level records its resolution in pixels per centimetre, so readers find ``mpp`` for level 0.
    ``labels`` is any 2-D array-like that supports strided slicing ``labels[r0:r1:k, ::k]``, such as
    numpy or zarr. It is read 4 tile rows of a level at a time.

    Returns the level sizes as (width, height) and the file path.
    """
    if len(labels.shape) != 2:
        raise ValueError(f"labels must be 2-D (rows, cols), got shape {tuple(labels.shape)}")
    if not mpp > 0:
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    m_rows, m_cols = (int(n) for n in labels.shape)
    if m_rows == 0 or m_cols == 0:
        raise ValueError(f"labels is empty, shape {(m_rows, m_cols)}; a TIFF needs at least one pixel")
    shapes = level_shapes(m_rows, m_cols)
    # Classic TIFF offsets are 32-bit (4 GiB). A pyramid of 2 GiB or more before compression is
    # written as BigTIFF, since noisy label maps compress poorly.
    bigtiff = sum(rows * cols for rows, cols in shapes) >= 2**31
    description = "label map; " + "; ".join(["0 background"] + [f"{c.label} {c.qupath_name}" for c in CLASSES])

    with atomic_output(path) as temporary, tifffile.TiffWriter(temporary, bigtiff=bigtiff) as tiff:
        for level, (lv_rows, lv_cols) in enumerate(shapes):
            step = 2**level
            tiff.write(
                _level_tiles(labels, step, lv_rows, lv_cols),
                shape=(lv_rows, lv_cols),
                dtype=np.uint8,
                tile=(TILE_PX, TILE_PX),
                compression="zlib",  # Adobe Deflate, TIFF compression code 8
                photometric="palette",
                colormap=palette_colormap(),
                resolution=(1e4 / (mpp * step), 1e4 / (mpp * step)),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                description=description if level == 0 else None,
                software="bcseg-wsi",
                metadata=None,
            )

    logger.info("wrote %s: %d levels, level 0 %d x %d px at %g mpp", path, len(shapes), m_cols, m_rows, mpp)
    return {"path": str(path), "level_sizes": [(cols, rows) for rows, cols in shapes], "mpp": mpp}


def _level_tiles(labels, step: int, lv_rows: int, lv_cols: int) -> Iterator[np.ndarray]:
    """Yield one level's tiles row by row, padded with 0 to full tiles at the right and bottom."""
    padded_cols = -(-lv_cols // TILE_PX) * TILE_PX
    band_rows = BAND_TILE_ROWS * TILE_PX
    for lv_row0 in range(0, lv_rows, band_rows):
        lv_row1 = min(lv_row0 + band_rows, lv_rows)
        band = _read_level_band(labels, step, lv_row0, lv_row1)

        padded = np.zeros((-(-band.shape[0] // TILE_PX) * TILE_PX, padded_cols), np.uint8)
        padded[: band.shape[0], :lv_cols] = band
        for row0 in range(0, padded.shape[0], TILE_PX):
            for col0 in range(0, padded_cols, TILE_PX):
                yield np.ascontiguousarray(padded[row0 : row0 + TILE_PX, col0 : col0 + TILE_PX])


def _read_level_band(labels, step: int, lv_row0: int, lv_row1: int) -> np.ndarray:
    band = np.asarray(labels[lv_row0 * step : lv_row1 * step : step, ::step])
    if not np.issubdtype(band.dtype, np.integer):
        raise ValueError(f"labels must hold integers, got dtype {band.dtype}")
    if band.size and (band.min() < 0 or band.max() > 255):
        raise ValueError(f"labels must be 0..255 for an 8-bit palette TIFF, found {band.min()}..{band.max()}")
    return band.astype(np.uint8, copy=False)
