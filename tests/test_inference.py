"""The overlapped pipeline: reader threads, batches, blending thread, bounded queues, shutdown."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bcseg.checkpoint import LoadedModel, ModelInfo
from bcseg.errors import BadInputError
from bcseg.model import build_model
from pipeline.inference import BLEND_QUEUE_BATCHES, Predictor, choose_batch_size, predict_stream, predict_tiles
from pipeline.stitching import Merger
from pipeline.tiling import TileGrid, read_tiles, select_tissue_tiles, write_tiles
from pipeline.tissue import TissueMask
from tests.test_stitching import ArraySlide, PointwiseModel


def pipeline_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("bcseg-")]


class CountingSlide(ArraySlide):
    """An ArraySlide that counts decoded tiles and fails on the tile at ``fail_at`` (x, y), if set."""

    def __init__(self, pixels: np.ndarray, fail_at: tuple[int, int] | None = None):
        super().__init__(pixels)
        self.reads = 0
        self.fail_at = fail_at
        self.lock = threading.Lock()

    def read_level_region(self, level, lv_x, lv_y, lv_width, lv_height):
        if (lv_x, lv_y) == self.fail_at:
            raise BadInputError(f"tile at {self.fail_at} is corrupt")
        with self.lock:
            self.reads += 1
        return super().read_level_region(level, lv_x, lv_y, lv_width, lv_height)


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def sequential_maps(pixels, grid, m_origins, tmp_path, tissue=None):
    """Blend through a tile store and a merger finalized at the end, one stage after another."""
    slide = ArraySlide(pixels)
    store = write_tiles(slide, grid, m_origins, 1.0, tmp_path / "tiles.zarr", workers=1)
    merger = Merger(tmp_path / "sequential.zarr", grid.m_width, grid.m_height, 5, grid.tile_size_px,
                    chunk_px=32, tissue=tissue, mpp=1.0)
    predict_tiles(store, PointwiseModel(), merger.add, batch_size=3)
    probabilities, labels = merger.finalize()
    return np.asarray(probabilities[:]), np.asarray(labels[:])


def overlapped_maps(pixels, grid, m_origins, tmp_path, tissue=None, max_open_bytes=2**30):
    slide = ArraySlide(pixels)
    merger = Merger(tmp_path / "overlapped.zarr", grid.m_width, grid.m_height, 5, grid.tile_size_px,
                    chunk_px=32, m_origins=m_origins, tissue=tissue, mpp=1.0, max_open_bytes=max_open_bytes)
    tiles = read_tiles(slide, m_origins, grid.tile_size_px, 1.0, workers=3, max_ahead=4)
    predict_stream(tiles, PointwiseModel(), merger.add, batch_size=3, total=len(m_origins))
    probabilities, labels = merger.finalize()
    return np.asarray(probabilities[:]), np.asarray(labels[:])


@pytest.mark.parametrize(
    "max_open_bytes",
    [pytest.param(2**30, id="all-chunks-in-memory"), pytest.param(1, id="spill-every-chunk")],
)
def test_overlapped_equals_sequential(max_open_bytes, tmp_path):
    pixels = image(101, 140)
    grid = TileGrid(140, 101, 40, 12)
    tissue = TissueMask(np.zeros((26, 35), dtype=bool), mpp=4.0)
    tissue.mask[5:15, 8:20] = True
    m_origins = select_tissue_tiles(grid, tissue, 1.0)

    expected = sequential_maps(pixels, grid, m_origins, tmp_path, tissue)
    probabilities, labels = overlapped_maps(pixels, grid, m_origins, tmp_path, tissue, max_open_bytes)

    assert 0 < len(m_origins) < len(grid.m_origins())
    np.testing.assert_array_equal(probabilities, expected[0])
    np.testing.assert_array_equal(labels, expected[1])
    assert not (tmp_path / "overlapped.zarr" / "weighted_sum").exists()


def test_chunks_finalize_when_last_tile_is_in(tmp_path):
    grid = TileGrid(96, 64, 32, 0)
    m_origins = grid.m_origins()
    merger = Merger(tmp_path / "p.zarr", 96, 64, 5, 32, chunk_px=32, m_origins=m_origins)
    probabilities = PointwiseModel().predict(image(32, 32)[None])[0]

    merger.add(0, 0, probabilities)

    assert np.asarray(merger.labels[:32, :32]).min() >= 1
    assert np.asarray(merger.labels[32:, :]).max() == 0
    with pytest.raises(ValueError, match="already finalized"):
        merger.add(0, 0, probabilities)


def test_reader_stays_bounded_ahead():
    slide = CountingSlide(image(64, 640))
    m_origins = TileGrid(640, 64, 32, 0).m_origins()

    tiles = read_tiles(slide, m_origins, 32, 1.0, workers=4, max_ahead=5)
    next(tiles)
    time.sleep(0.3)
    reads_while_waiting = slide.reads
    tiles.close()

    assert len(m_origins) == 40
    assert reads_while_waiting <= 1 + 5
    assert pipeline_threads() == []


def test_slow_blending_bounds_decoded_tiles():
    slide = CountingSlide(image(64, 960))
    m_origins = TileGrid(960, 64, 32, 0).m_origins()
    batch_size, max_ahead = 2, 4
    decoded_not_blended = []
    blended = 0

    def slow_add(m_x, m_y, probabilities):
        nonlocal blended
        time.sleep(0.005)
        blended += 1
        decoded_not_blended.append(slide.reads - blended)

    tiles = read_tiles(slide, m_origins, 32, 1.0, workers=4, max_ahead=max_ahead)
    done = predict_stream(tiles, PointwiseModel(), slow_add, batch_size)

    assert done == len(m_origins) == 60
    # Tiles held: up to max_ahead with the readers, one batch being assembled, one being
    # predicted, the blending queue, and one batch in the blending thread.
    assert max(decoded_not_blended) <= max_ahead + batch_size * (BLEND_QUEUE_BATCHES + 3)
    assert pipeline_threads() == []


def test_reader_error_stops_every_stage(tmp_path):
    slide = CountingSlide(image(64, 640), fail_at=(320, 32))
    grid = TileGrid(640, 64, 32, 0)
    merger = Merger(tmp_path / "p.zarr", 640, 64, 5, 32, m_origins=grid.m_origins())
    tiles = read_tiles(slide, grid.m_origins(), 32, 1.0, workers=3, max_ahead=4)

    with pytest.raises(BadInputError, match="corrupt"):
        predict_stream(tiles, PointwiseModel(), merger.add, batch_size=2)

    assert pipeline_threads() == []
    assert slide.reads < len(grid.m_origins())


def test_blending_error_stops_every_stage():
    slide = CountingSlide(image(64, 640))
    m_origins = TileGrid(640, 64, 32, 0).m_origins()

    def failing_add(m_x, m_y, probabilities):
        raise OSError("disk full")

    tiles = read_tiles(slide, m_origins, 32, 1.0, workers=3, max_ahead=4)
    with pytest.raises(OSError, match="disk full"):
        predict_stream(tiles, PointwiseModel(), failing_add, batch_size=2)

    assert pipeline_threads() == []
    assert slide.reads < len(m_origins)


def test_interrupt_stops_every_stage():
    slide = CountingSlide(image(64, 640))
    m_origins = TileGrid(640, 64, 32, 0).m_origins()

    class InterruptedModel(PointwiseModel):
        calls = 0

        def predict(self, tiles):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return super().predict(tiles)

    tiles = read_tiles(slide, m_origins, 32, 1.0, workers=3, max_ahead=4)
    with pytest.raises(KeyboardInterrupt):
        predict_stream(tiles, InterruptedModel(), lambda m_x, m_y, p: None, batch_size=2)

    assert pipeline_threads() == []


def test_predictor_stream_matches_batch_predict():
    torch.manual_seed(0)
    loaded = LoadedModel(build_model().eval(), ModelInfo(mpp=1.0, tile_size_px=64), Path("random"), "", "float32")
    predictor = Predictor(loaded, torch.device("cpu"), threads=1)
    tiles = image(64, 64 * 3).reshape(64, 3, 64, 3).transpose(1, 0, 2, 3)
    received = {}

    def add(m_x, m_y, probabilities):
        received[m_x] = probabilities

    predict_stream(((64 * i, 0, tile) for i, tile in enumerate(tiles)), predictor, add, batch_size=2)

    expected = predictor.predict(np.ascontiguousarray(tiles))
    assert sorted(received) == [0, 64, 128]
    for index, m_x in enumerate(sorted(received)):
        np.testing.assert_allclose(received[m_x], expected[index], atol=1e-5)
    assert choose_batch_size(predictor, 64, None) >= 1
    assert choose_batch_size(predictor, 64, 3) == 3
