"""The tiler: an overlapping grid at model resolution, and tissue tiles decoded ahead of the model.

A tile is ``tile_size_px`` square at the model's mpp. Tiles start every ``stride_px =
tile_size_px - overlap_px`` pixels from (-margin_px, -margin_px), where ``margin_px`` is half the
overlap, and the grid reaches ``margin_px`` past the right and bottom edges. So a pixel at the
slide's edge has as much context as one on a seam between tiles, and the model sees white
padding there rather than its own zero padding. Parts of tiles outside the slide read as white,
and the stitcher crops them off.

``read_tiles`` decodes tiles in a pool of reader threads, a bounded number ahead of the model.
``TileStoreWriter`` and ``write_tiles`` keep a copy of the tiles in a zarr store.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bcseg import __version__
from bcseg.errors import BadInputError

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class TileGrid:
    """Tile positions over a slide of ``m_width`` x ``m_height`` pixels at model resolution."""

    m_width: int
    m_height: int
    tile_size_px: int
    overlap_px: int

    def __post_init__(self):
        if self.tile_size_px < 16:
            raise BadInputError(f"--tile-size {self.tile_size_px} is too small; use at least 16 pixels")
        if not 0 <= self.overlap_px < self.tile_size_px // 2 + 1:
            raise BadInputError(
                f"--overlap {self.overlap_px} must be between 0 and half the tile size "
                f"({self.tile_size_px // 2} for --tile-size {self.tile_size_px})"
            )

    @property
    def stride_px(self) -> int:
        return self.tile_size_px - self.overlap_px

    @property
    def margin_px(self) -> int:
        """Distance in pixels that the grid reaches past each edge of the slide: half the overlap."""
        return self.overlap_px // 2

    @property
    def t_shape(self) -> tuple[int, int]:
        """Number of tile (rows, cols)."""
        reach = 2 * self.margin_px
        return _tile_count(self.m_height + reach, self.tile_size_px, self.stride_px), _tile_count(
            self.m_width + reach, self.tile_size_px, self.stride_px
        )

    def m_origins(self) -> np.ndarray:
        """Return all tile origins as an (n, 2) int64 array of (m_x, m_y), in row-major order."""
        t_rows, t_cols = self.t_shape
        m_ys, m_xs = np.meshgrid(
            np.arange(t_rows) * self.stride_px - self.margin_px,
            np.arange(t_cols) * self.stride_px - self.margin_px,
            indexing="ij",
        )
        return np.stack([m_xs.ravel(), m_ys.ravel()], axis=1).astype(np.int64)


def _tile_count(m_length: int, tile_size_px: int, stride_px: int) -> int:
    if m_length <= tile_size_px:
        return 1
    return math.ceil((m_length - tile_size_px) / stride_px) + 1


def select_tissue_tiles(grid: TileGrid, tissue, mpp: float) -> np.ndarray:
    """Origins (m_x, m_y) of the tiles that touch tissue; all tiles when ``tissue`` is None."""
    m_origins = grid.m_origins()
    if tissue is None:
        return m_origins
    keep = [
        tissue.covers(int(m_x), int(m_y), grid.tile_size_px, grid.tile_size_px, mpp)
        for m_x, m_y in m_origins
    ]
    return m_origins[np.asarray(keep, dtype=bool)] if len(m_origins) else m_origins


def read_tile(slide, m_x: int, m_y: int, tile_size_px: int, mpp: float) -> np.ndarray:
    """Decode the tile with its origin at (m_x, m_y), in pixels at ``mpp``; returns RGB uint8.

    Every tile of a run is decoded here. The part of a tile left of or above the slide is white
    (the reader pads the right and bottom itself). A decoder failure becomes a BadInputError that
    names the tile's level-0 position.
    """
    try:
        if m_x >= 0 and m_y >= 0:
            return slide.read_region_at_mpp(m_x, m_y, tile_size_px, tile_size_px, mpp)
        skip_x, skip_y = max(0, -m_x), max(0, -m_y)
        tile = np.full((tile_size_px, tile_size_px, 3), 255, dtype=np.uint8)
        if skip_x < tile_size_px and skip_y < tile_size_px:
            tile[skip_y:, skip_x:] = slide.read_region_at_mpp(
                m_x + skip_x, m_y + skip_y, tile_size_px - skip_x, tile_size_px - skip_y, mpp
            )
        return tile
    except (BadInputError, MemoryError):
        raise
    except Exception as error:  # decoder errors differ per backend and codec
        l0_per_px = mpp / slide.mpp
        l0_x, l0_y = round(m_x * l0_per_px), round(m_y * l0_per_px)
        raise BadInputError(
            f"{slide.path}: failed to read the tile at level-0 (x={l0_x}, y={l0_y}), "
            f"{round(tile_size_px * l0_per_px)} px square: {error}. The file is probably corrupt there; "
            "re-export or re-scan the slide"
        ) from error


def read_tiles(
    slide,
    m_origins: np.ndarray,
    tile_size_px: int,
    mpp: float,
    workers: int = 4,
    max_ahead: int = 16,
    on_tile: Callable[[int, np.ndarray], None] | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield (m_x, m_y, pixels) for each origin, in order, decoded ahead by ``workers`` threads.

    At most ``max_ahead`` tiles are decoded or waiting at any time, so memory stays bounded
    however far the readers could run ahead of the consumer. ``on_tile(index, pixels)``, when
    given, runs in the reader thread after each decode (used to keep a copy of the tiles).
    Closing the generator, or an error in a reader, cancels the tiles not yet started and waits
    for the reader threads to exit.
    """
    max_ahead = max(1, max_ahead)

    def decode(index: int) -> np.ndarray:
        m_x, m_y = (int(value) for value in m_origins[index])
        pixels = read_tile(slide, m_x, m_y, tile_size_px, mpp)
        if on_tile is not None:
            on_tile(index, pixels)
        return pixels

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="bcseg-tile-reader")
    pending: deque[Future] = deque()
    next_index = 0
    try:
        for index in range(len(m_origins)):
            # Keep the readers up to max_ahead tiles ahead of the consumer.
            while next_index < len(m_origins) and len(pending) < max_ahead:
                pending.append(pool.submit(decode, next_index))
                next_index += 1
            pixels = pending.popleft().result()
            m_x, m_y = (int(value) for value in m_origins[index])
            yield m_x, m_y, pixels
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class TileStoreWriter:
    """A new zarr tile store that tiles are written into one by one, as they are decoded."""

    def __init__(
        self,
        store_path: str | os.PathLike,
        slide,
        grid: TileGrid,
        m_origins: np.ndarray,
        mpp: float,
        metadata: dict[str, Any] | None = None,
    ):
        tile = grid.tile_size_px
        self.path = Path(store_path)
        root = zarr.open_group(str(store_path), mode="w")
        self.tiles = root.create_array(
            "tiles", shape=(len(m_origins), tile, tile, 3), chunks=(1, tile, tile, 3), dtype="uint8"
        )
        root.create_array("m_origins", data=np.asarray(m_origins, dtype=np.int64).reshape(-1, 2))
        l0_per_px = mpp / slide.mpp
        level = slide.best_level_for_downsample(l0_per_px)
        root.attrs.update(
            {
                "slide_path": str(slide.path),
                "slide_mpp": slide.mpp,
                "mpp": mpp,
                "level": level,
                "level_downsample": slide.level_downsamples[level],
                "l0_per_px": l0_per_px,
                "m_width": grid.m_width,
                "m_height": grid.m_height,
                "tile_size_px": tile,
                "overlap_px": grid.overlap_px,
                "origin_frame": "(m_x, m_y): pixels at mpp; level-0 position = m * l0_per_px",
                "package_version": __version__,
                **(metadata or {}),
            }
        )

    def write(self, index: int, pixels: np.ndarray) -> None:
        """Store tile ``index``; each tile is its own chunk, so reader threads may call this at once."""
        self.tiles[index] = pixels


def write_tiles(
    slide,
    grid: TileGrid,
    m_origins: np.ndarray,
    mpp: float,
    store_path: str | os.PathLike,
    workers: int = 4,
    metadata: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> TileStore:
    """Read the tiles at ``m_origins`` from ``slide`` at ``mpp`` into a new zarr store.

    Tiles are read by ``workers`` threads (openslide and tifffile release the GIL while decoding)
    and each is written as its own compressed chunk.
    """
    writer = TileStoreWriter(store_path, slide, grid, m_origins, mpp, metadata)
    tiles = read_tiles(
        slide, m_origins, grid.tile_size_px, mpp, workers=workers, max_ahead=2 * max(1, workers), on_tile=writer.write
    )
    for done, _ in enumerate(tiles, start=1):
        if progress is not None:
            progress(done, len(m_origins))
    log.info("wrote %d tiles of %d px to %s", len(m_origins), grid.tile_size_px, store_path)
    return TileStore(store_path)


class TileStore:
    """Read access to a tile store written by ``write_tiles``."""

    def __init__(self, store_path: str | os.PathLike):
        self.path = Path(store_path)
        self._root = zarr.open_group(str(store_path), mode="r")
        self.tiles = self._root["tiles"]
        self.m_origins = np.asarray(self._root["m_origins"][:]).reshape(-1, 2)
        self.attrs = dict(self._root.attrs)

    def __len__(self) -> int:
        return self.tiles.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tiles ``start..stop-1`` as uint8 (n, rows, cols, 3)."""
        return np.asarray(self.tiles[start:stop])
