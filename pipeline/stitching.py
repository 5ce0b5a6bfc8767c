"""The stitcher: blends overlapping tile predictions into slide-level maps on disk.

Each tile's class probabilities are multiplied by a weight that falls off toward the tile's
borders and added to a slide-level ``weighted_sum`` (classes, rows, cols). The weights themselves
are added to ``weight_sum`` (rows, cols). Both live in a zarr store at model resolution, so the slide is never
held in memory. ``finalize`` then walks the store chunk by chunk, divides, and writes
``probabilities`` (float16) and ``labels`` (uint8: 0 background, 1..5 the classes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from bcseg.classes import BACKGROUND_LABEL

log = logging.getLogger(__name__)

BLEND_MODES = ("gaussian", "cosine", "constant")
DEFAULT_CHUNK_PX = 512
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
    """Accumulates weighted tile predictions in a zarr store and finalizes them chunk by chunk.

    Tiles may reach past the slide (padded edge tiles); the part outside is cropped here.
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
    ):
        self.m_width, self.m_height = m_width, m_height
        self.num_classes = num_classes
        self.chunk_px = chunk_px
        self.weights = blend_weights(tile_size_px, blend_mode)
        self.root = zarr.open_group(str(store_path), mode="w")
        self.root.attrs.update({"m_width": m_width, "m_height": m_height, "blend_mode": blend_mode, **(attrs or {})})
        # Sums are scratch data: a fast codec matters more than size, and they are removed later.
        fast = [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")]
        self.weighted_sum = self.root.create_array(
            "weighted_sum", shape=(num_classes, m_height, m_width), chunks=(num_classes, chunk_px, chunk_px),
            dtype="float32", fill_value=0.0, compressors=fast,
        )
        self.weight_sum = self.root.create_array(
            "weight_sum", shape=(m_height, m_width), chunks=(chunk_px, chunk_px),
            dtype="float32", fill_value=0.0, compressors=fast,
        )

    def add(self, m_x: int, m_y: int, probabilities: np.ndarray) -> None:
        """Add one tile's (classes, rows, cols) probabilities with its origin at (m_x, m_y)."""
        rows = min(probabilities.shape[1], self.m_height - m_y)
        cols = min(probabilities.shape[2], self.m_width - m_x)
        if rows <= 0 or cols <= 0:
            return
        weights = self.weights[:rows, :cols]
        region = (slice(m_y, m_y + rows), slice(m_x, m_x + cols))
        self.weighted_sum[(slice(None), *region)] = (
            self.weighted_sum[(slice(None), *region)] + probabilities[:, :rows, :cols] * weights
        )
        self.weight_sum[region] = self.weight_sum[region] + weights

    def finalize(
        self,
        tissue=None,
        mpp: float | None = None,
        keep_sums: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[zarr.Array, zarr.Array]:
        """Write ``probabilities`` and ``labels`` chunk by chunk and return both arrays.

        Pixels that no tile covered are background (label 0, probability 0). So are pixels
        outside ``tissue``, a TissueMask sampled at each pixel's centre, where ``mpp`` is the
        model resolution.
        """
        chunk = self.chunk_px
        probabilities = self.root.create_array(
            "probabilities", shape=(self.num_classes, self.m_height, self.m_width),
            chunks=(self.num_classes, chunk, chunk), dtype="float16", fill_value=0.0,
        )
        labels = self.root.create_array(
            "labels", shape=(self.m_height, self.m_width), chunks=(chunk, chunk), dtype="uint8",
            fill_value=BACKGROUND_LABEL,
        )
        chunk_origins = [(r, c) for r in range(0, self.m_height, chunk) for c in range(0, self.m_width, chunk)]
        for done, (m_row, m_col) in enumerate(chunk_origins, start=1):
            rows = min(chunk, self.m_height - m_row)
            cols = min(chunk, self.m_width - m_col)
            region = (slice(m_row, m_row + rows), slice(m_col, m_col + cols))
            weight = np.asarray(self.weight_sum[region])
            covered = weight > 0
            if tissue is not None:
                covered &= tissue_mask_at(tissue, m_col, m_row, cols, rows, mpp)
            if covered.any():
                summed = np.asarray(self.weighted_sum[(slice(None), *region)])
                chunk_probabilities = np.where(covered, summed / np.where(covered, weight, 1.0), 0.0)
                chunk_labels = np.where(covered, np.argmax(chunk_probabilities, axis=0) + 1, BACKGROUND_LABEL)
                probabilities[(slice(None), *region)] = chunk_probabilities.astype(np.float16)
                labels[region] = chunk_labels.astype(np.uint8)
            if progress is not None:
                progress(done, len(chunk_origins))

        if not keep_sums:
            del self.root["weighted_sum"]
            del self.root["weight_sum"]
        return probabilities, labels


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
