"""Tiler and stitcher invariance: a pointwise model through tiles equals it on the whole image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.inference import predict_tiles
from pipeline.slide.base import Slide
from pipeline.stitching import BLEND_MODES, Merger, blend_weights
from pipeline.tiling import TileGrid, TileStore, select_tissue_tiles, write_tiles


class ArraySlide(Slide):
    """A one-level slide backed by an in-memory RGB array, for tests of tiling geometry."""

    def __init__(self, pixels: np.ndarray, mpp: float = 1.0):
        self.pixels = pixels
        self.path = Path("array-slide")
        self.backend = "array"
        self.level_dimensions = ((pixels.shape[1], pixels.shape[0]),)
        self.level_downsamples = (1.0,)
        self.mpp = mpp
        self.mpp_source = "test"
        self.vendor = "test"
        self.properties = {}
        self.associated_image_names = ()

    def read_level_region(self, level, lv_x, lv_y, lv_width, lv_height):
        region = np.full((lv_height, lv_width, 3), 255, dtype=np.uint8)
        height, width = self.pixels.shape[:2]
        x0, y0 = max(lv_x, 0), max(lv_y, 0)
        x1, y1 = min(lv_x + lv_width, width), min(lv_y + lv_height, height)
        if x1 > x0 and y1 > y0:
            region[y0 - lv_y : y1 - lv_y, x0 - lv_x : x1 - lv_x] = self.pixels[y0:y1, x0:x1]
        return region


class PointwiseModel:
    """Softmax of a fixed linear map of each pixel's RGB: the output depends on that pixel only."""

    weights = np.array([[3.0, -1.0, 0.5], [-2.0, 2.0, 1.0], [0.5, 0.5, -3.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 2.0]])
    bias = np.array([0.1, -0.2, 0.3, -1.5, 0.0])

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        logits = np.einsum("kc,bhwc->bkhw", self.weights, tiles / 255.0) + self.bias[None, :, None, None]
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def run_tiled(pixels: np.ndarray, tile_size: int, overlap: int, blend_mode: str, tmp_path: Path):
    slide = ArraySlide(pixels)
    width, height = slide.size_at_mpp(1.0)
    grid = TileGrid(width, height, tile_size, overlap)
    origins = select_tissue_tiles(grid, None, 1.0)
    store = write_tiles(slide, grid, origins, 1.0, tmp_path / "tiles.zarr", workers=2)
    merger = Merger(tmp_path / "prediction.zarr", width, height, 5, tile_size, blend_mode=blend_mode, chunk_px=32)
    predict_tiles(store, PointwiseModel(), merger.add, batch_size=3)
    probabilities, labels = merger.finalize()
    return np.asarray(probabilities[:]).astype(np.float32), np.asarray(labels[:])


@pytest.mark.parametrize(
    "height, width, tile_size, overlap",
    [
        pytest.param(97, 131, 32, 8, id="odd-size"),
        pytest.param(20, 27, 32, 8, id="smaller-than-tile"),
        pytest.param(64, 64, 32, 0, id="no-overlap-exact-fit"),
        pytest.param(100, 75, 40, 16, id="wide-overlap"),
        pytest.param(33, 65, 32, 1, id="one-pixel-overlap"),
    ],
)
@pytest.mark.parametrize("blend_mode", BLEND_MODES)
def test_pointwise_model_invariant(height, width, tile_size, overlap, blend_mode, tmp_path):
    rng = np.random.default_rng(height * 1000 + width)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)

    probabilities, labels = run_tiled(pixels, tile_size, overlap, blend_mode, tmp_path)

    expected = PointwiseModel().predict(pixels[None])[0]
    assert probabilities.shape == (5, height, width)
    # Probabilities are stored as float16, which bounds the difference.
    np.testing.assert_allclose(probabilities, expected, atol=2e-3)
    expected_labels = np.argmax(expected, axis=0) + 1
    # Ties between classes within float16 resolution may pick either; require all others exact.
    top_two = np.sort(expected, axis=0)[-2:]
    clear = (top_two[1] - top_two[0]) > 4e-3
    np.testing.assert_array_equal(labels[clear], expected_labels[clear])


def test_no_seam_at_tile_borders(tmp_path):
    # A smooth gradient image: any seam would show as a jump in probabilities along tile borders.
    rows, cols = np.mgrid[0:90, 0:150]
    pixels = np.stack([rows * 2, cols, 255 - cols], axis=-1).astype(np.uint8)

    probabilities, _ = run_tiled(pixels, 32, 8, "gaussian", tmp_path)

    expected = PointwiseModel().predict(pixels[None])[0]
    assert np.abs(probabilities - expected).max() < 2e-3


def test_tiles_reach_half_the_overlap_past_every_edge():
    grid = TileGrid(m_width=100, m_height=50, tile_size_px=32, overlap_px=8)

    origins = grid.m_origins()

    assert grid.t_shape == (3, 5)
    assert list(np.unique(origins[:, 0])) == [-4, 20, 44, 68, 92]
    assert list(np.unique(origins[:, 1])) == [-4, 20, 44]
    assert origins[:, 0].max() + 32 >= 100 + 4
    assert origins[:, 1].max() + 32 >= 50 + 4


def test_tiles_without_overlap_start_at_the_corner():
    grid = TileGrid(m_width=100, m_height=50, tile_size_px=32, overlap_px=0)

    assert list(np.unique(grid.m_origins()[:, 0])) == [0, 32, 64, 96]


def test_padded_edge_tile_is_white(tmp_path):
    pixels = np.zeros((20, 27, 3), dtype=np.uint8)
    slide = ArraySlide(pixels)
    grid = TileGrid(27, 20, 32, 8)

    store = write_tiles(slide, grid, grid.m_origins(), 1.0, tmp_path / "tiles.zarr", workers=1)

    tile = TileStore(store.path).read(0, 1)[0]
    assert (tile[4:24, 4:31] == 0).all()
    inside = np.zeros(tile.shape[:2], dtype=bool)
    inside[4:24, 4:31] = True
    assert (tile[~inside] == 255).all()


def test_tile_store_records_geometry(tmp_path):
    slide = ArraySlide(np.zeros((40, 40, 3), dtype=np.uint8), mpp=0.5)
    grid = TileGrid(20, 20, 16, 4)

    store = write_tiles(slide, grid, grid.m_origins(), 1.0, tmp_path / "tiles.zarr", metadata={"slide_fingerprint": "abc"})

    assert store.attrs["l0_per_px"] == 2.0
    assert store.attrs["tile_size_px"] == 16
    assert store.attrs["overlap_px"] == 4
    assert store.attrs["slide_fingerprint"] == "abc"
    assert len(store) == 4


@pytest.mark.parametrize("mode", BLEND_MODES)
def test_blend_weights_peak_at_centre(mode):
    weights = blend_weights(64, mode)

    assert weights.shape == (64, 64)
    assert weights.max() == pytest.approx(1.0)
    assert weights.min() > 0
    if mode != "constant":
        assert weights[0, 0] < weights[32, 32]
