"""The stitcher: blends overlapping tile predictions into slide-level maps on disk.

Each tile's class probabilities are multiplied by a weight that falls off toward the tile's
borders and added to a weighted sum (classes, rows, cols). The weights themselves are added to
a weight sum (rows, cols). Both are kept in memory per chunk of ``chunk_px`` square at model
resolution. A chunk is finalized (divided, masked to tissue, written as ``probabilities``
float16 and ``labels`` uint8, 0 background and 1..5 the classes) once the last tile that touches
it has been added, so every output chunk is written once and never read back. When the open
chunks outgrow a memory budget, the least recently used ones are spilled to scratch arrays in the
store, so memory does not grow with the slide.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from bcseg.classes import BACKGROUND_LABEL

log = logging.getLogger(__name__)

BLEND_MODES = ("gaussian", "cosine", "constant")
DEFAULT_CHUNK_PX = 512
# Memory for the sums of open chunks, about 42 chunks of 512 px with 5 classes. A tile row of a
# slide up to about 10,000 px wide at model resolution fits, so only wider slides spill to disk.
DEFAULT_MAX_OPEN_BYTES = 256 * 1024 * 1024
# Weights never fall below this fraction of the centre weight, so a pixel that only one tile
# covers near its border (at the slide's edge) still gets that tile's prediction.
MIN_RELATIVE_WEIGHT = 1e-3


def blend_weights(tile_size_px: int, mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Build a (tile_size_px, tile_size_px) float32 weight map, 1 at the centre, falling toward the borders.

    ``gaussian`` uses a standard deviation of ``sigma_scale * tile_size_px``; ``cosine`` is a
    Hann window; ``constant`` weighs every pixel equally (a plain average).
    """
    if mode not in BLEND_MODES:
        raise ValueError(f"unknown blend mode {mode!r}; choose one of {', '.join(BLEND_MODES)}")
    centres = np.arange(tile_size_px, dtype=np.float64) + 0.5 - tile_size_px / 2
    if mode == "gaussian":
        profile = np.exp(-0.5 * (centres / (sigma_scale * tile_size_px)) ** 2)
    elif mode == "cosine":
        profile = np.cos(np.pi * centres / tile_size_px) ** 2
    else:
        profile = np.ones(tile_size_px)
    weights = np.outer(profile, profile)
    weights /= weights.max()
    return np.maximum(weights, MIN_RELATIVE_WEIGHT).astype(np.float32)


class Merger:
    """Accumulates weighted tile predictions chunk by chunk and writes each finished chunk once.

    ``m_origins``, when given, lists every tile origin (m_x, m_y) that will be added. A chunk is
    then finalized as soon as its last tile has been added; without it, every chunk waits for
    ``finalize``. Pixels that no tile covered are background (label 0, probability 0), and so are
    pixels outside ``tissue``, a TissueMask sampled at each pixel's centre, where ``mpp`` is the
    model resolution. Tiles may reach past any edge of the slide (padded edge tiles); the part
    outside is cropped here. Sums from tiles added in the same order are bit for bit those of a plain float32
    array of the whole slide.
    """

    def __init__(
        self,
        store_path: str | os.PathLike,
        m_width: int,
        m_height: int,
        num_classes: int,
        tile_size_px: int,
        blend_mode: str = "gaussian",
        chunk_px: int = DEFAULT_CHUNK_PX,
        attrs: dict | None = None,
        m_origins: np.ndarray | None = None,
        tissue=None,
        mpp: float | None = None,
        max_open_bytes: int = DEFAULT_MAX_OPEN_BYTES,
    ):
        if tissue is not None and mpp is None:
            raise ValueError("mpp (the model resolution) is required with a tissue mask")
        self.m_width, self.m_height = m_width, m_height
        self.num_classes = num_classes
        self.chunk_px = chunk_px
        self.tissue, self.mpp = tissue, mpp
        self.weights = blend_weights(tile_size_px, blend_mode)
        self.max_open_chunks = max(1, max_open_bytes // ((num_classes + 1) * chunk_px * chunk_px * 4))
        self.root = zarr.open_group(str(store_path), mode="w")
        self.root.attrs.update({"m_width": m_width, "m_height": m_height, "blend_mode": blend_mode, **(attrs or {})})
        self.probabilities = self.root.create_array(
            "probabilities", shape=(num_classes, m_height, m_width),
            chunks=(num_classes, chunk_px, chunk_px), dtype="float16", fill_value=0.0,
        )
        self.labels = self.root.create_array(
            "labels", shape=(m_height, m_width), chunks=(chunk_px, chunk_px), dtype="uint8",
            fill_value=BACKGROUND_LABEL,
        )

        # Open chunks, least recently used first: chunk (row, col) -> (weighted sum, weight sum).
        self._open: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._spilled: set[tuple[int, int]] = set()
        self._finished: set[tuple[int, int]] = set()
        self._scratch: tuple[zarr.Array, zarr.Array] | None = None
        self._tiles_left: dict[tuple[int, int], int] | None = None
        if m_origins is not None:
            self._tiles_left = {}
            for m_x, m_y in np.asarray(m_origins).reshape(-1, 2):
                for key in self._chunks_under(int(m_x), int(m_y)):
                    self._tiles_left[key] = self._tiles_left.get(key, 0) + 1

    def add(self, m_x: int, m_y: int, probabilities: np.ndarray) -> None:
        """Add one tile's (classes, rows, cols) probabilities with its origin at (m_x, m_y)."""
        keys = self._chunks_under(m_x, m_y)
        for key in keys:
            if key in self._finished:
                raise ValueError(
                    f"the tile at (m_x={m_x}, m_y={m_y}) touches chunk {key}, which was already finalized; "
                    "every tile must be listed in m_origins"
                )
            sums, weight_sums = self._chunk(key)
            chunk_row, chunk_col = key[0] * self.chunk_px, key[1] * self.chunk_px
            # The overlap of tile and chunk, in slide pixels, then in each one's own frame.
            m_row0, m_col0 = max(m_y, chunk_row), max(m_x, chunk_col)
            m_row1 = min(m_y + probabilities.shape[1], chunk_row + sums.shape[1])
            m_col1 = min(m_x + probabilities.shape[2], chunk_col + sums.shape[2])
            in_tile = (slice(m_row0 - m_y, m_row1 - m_y), slice(m_col0 - m_x, m_col1 - m_x))
            in_chunk = (slice(m_row0 - chunk_row, m_row1 - chunk_row), slice(m_col0 - chunk_col, m_col1 - chunk_col))
            weights = self.weights[in_tile]
            sums[(slice(None), *in_chunk)] += probabilities[(slice(None), *in_tile)] * weights
            weight_sums[in_chunk] += weights

        if self._tiles_left is not None:
            for key in keys:
                self._tiles_left[key] -= 1
                if self._tiles_left[key] == 0:
                    self._write_result(key, *self._open.pop(key))
        while len(self._open) > self.max_open_chunks:
            key, (sums, weight_sums) = self._open.popitem(last=False)
            self._spill(key, sums, weight_sums)

    def finalize(self, progress: Callable[[int, int], None] | None = None) -> tuple[zarr.Array, zarr.Array]:
        """Write the chunks still open or spilled, remove the scratch arrays, return (probabilities, labels)."""
        keys = sorted(set(self._open) | self._spilled)
        for done, key in enumerate(keys, start=1):
            if key in self._open:
                self._write_result(key, *self._open.pop(key))
            else:
                self._write_result(key, *self._read_spilled(key))
            if progress is not None:
                progress(done, len(keys))
        if self._scratch is not None:
            del self.root["weighted_sum"]
            del self.root["weight_sum"]
            self._scratch = None
        self._spilled.clear()
        return self.probabilities, self.labels

    def _chunks_under(self, m_x: int, m_y: int) -> list[tuple[int, int]]:
        """Chunks (row, col) that the tile at (m_x, m_y) covers inside the slide."""
        tile_rows, tile_cols = self.weights.shape
        m_row0, m_col0 = max(m_y, 0), max(m_x, 0)
        m_row1, m_col1 = min(m_y + tile_rows, self.m_height), min(m_x + tile_cols, self.m_width)
        if m_row1 <= m_row0 or m_col1 <= m_col0:
            return []
        chunk = self.chunk_px
        return [
            (chunk_row, chunk_col)
            for chunk_row in range(m_row0 // chunk, (m_row1 - 1) // chunk + 1)
            for chunk_col in range(m_col0 // chunk, (m_col1 - 1) // chunk + 1)
        ]

    def _chunk_shape(self, key: tuple[int, int]) -> tuple[int, int]:
        chunk = self.chunk_px
        return min(chunk, self.m_height - key[0] * chunk), min(chunk, self.m_width - key[1] * chunk)

    def _chunk_region(self, key: tuple[int, int]) -> tuple[slice, slice]:
        rows, cols = self._chunk_shape(key)
        m_row, m_col = key[0] * self.chunk_px, key[1] * self.chunk_px
        return slice(m_row, m_row + rows), slice(m_col, m_col + cols)

    def _chunk(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Return the open sums of a chunk, reading them back if spilled or starting at zero."""
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        if key in self._spilled:
            sums = self._read_spilled(key)
            self._spilled.discard(key)
        else:
            rows, cols = self._chunk_shape(key)
            sums = np.zeros((self.num_classes, rows, cols), np.float32), np.zeros((rows, cols), np.float32)
        self._open[key] = sums
        return sums

    def _spill(self, key: tuple[int, int], sums: np.ndarray, weight_sums: np.ndarray) -> None:
        if self._scratch is None:
            # Scratch data: a fast codec matters more than size, and it is removed by finalize.
            fast = [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")]
            chunk = self.chunk_px
            self._scratch = (
                self.root.create_array(
                    "weighted_sum", shape=(self.num_classes, self.m_height, self.m_width),
                    chunks=(self.num_classes, chunk, chunk), dtype="float32", fill_value=0.0, compressors=fast,
                ),
                self.root.create_array(
                    "weight_sum", shape=(self.m_height, self.m_width), chunks=(chunk, chunk),
                    dtype="float32", fill_value=0.0, compressors=fast,
                ),
            )
            log.info("open blending chunks exceed %d; spilling the least recently used to disk", self.max_open_chunks)
        region = self._chunk_region(key)
        self._scratch[0][(slice(None), *region)] = sums
        self._scratch[1][region] = weight_sums
        self._spilled.add(key)

    def _read_spilled(self, key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        region = self._chunk_region(key)
        return np.asarray(self._scratch[0][(slice(None), *region)]), np.asarray(self._scratch[1][region])

    def _write_result(self, key: tuple[int, int], sums: np.ndarray, weight_sums: np.ndarray) -> None:
        """Divide a chunk's sums, mask it to tissue and write its probabilities and labels."""
        self._finished.add(key)
        region = self._chunk_region(key)
        covered = weight_sums > 0
        if self.tissue is not None:
            rows, cols = weight_sums.shape
            covered &= tissue_mask_at(self.tissue, region[1].start, region[0].start, cols, rows, self.mpp)
        if not covered.any():
            return
        chunk_probabilities = np.where(covered, sums / np.where(covered, weight_sums, 1.0), 0.0)
        chunk_labels = np.where(covered, np.argmax(chunk_probabilities, axis=0) + 1, BACKGROUND_LABEL)
        self.probabilities[(slice(None), *region)] = chunk_probabilities.astype(np.float16)
        self.labels[region] = chunk_labels.astype(np.uint8)


def tissue_mask_at(tissue, m_x: int, m_y: int, m_width: int, m_height: int, mpp: float) -> np.ndarray:
    """Sample the tissue mask at the centres of a box of model pixels; return bool (rows, cols)."""
    scale = mpp / tissue.mpp
    tissue_rows = np.floor((np.arange(m_y, m_y + m_height) + 0.5) * scale).astype(np.int64)
    tissue_cols = np.floor((np.arange(m_x, m_x + m_width) + 0.5) * scale).astype(np.int64)
    mask = tissue.mask
    inside_rows = tissue_rows < mask.shape[0]
    inside_cols = tissue_cols < mask.shape[1]
    sampled = np.zeros((m_height, m_width), dtype=bool)
    sampled[np.ix_(inside_rows, inside_cols)] = mask[np.ix_(tissue_rows[inside_rows], tissue_cols[inside_cols])]
    return sampled


def open_prediction(store_path: str | os.PathLike) -> tuple[zarr.Array, zarr.Array, dict]:
    """Open a finalized prediction store: (probabilities, labels, attributes)."""
    root = zarr.open_group(str(store_path), mode="r")
    return root["probabilities"], root["labels"], dict(root.attrs)
