"""Unusual slides at the reader level: resolution metadata, pyramid layouts, bounds offsets, sparse
and very large images, JPEG 2000 tiles, tiles that fail to decode and damaged files, all on
synthetic TIFF files written with tifffile."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pytest
import tifffile

from bcseg.errors import BadInputError, TileDecodeError
from pipeline.slide import open_slide
from tests.leica_scn import write_leica_scn

BACKENDS = ("openslide", "tifffile")
REPO = Path(__file__).resolve().parents[1]
HALF_MICRON_PER_CM = {"resolution": (20_000, 20_000), "resolutionunit": "CENTIMETER"}
APERIO_DESCRIPTION = "Aperio Image Library v12.0.5\r\n{width}x{height} [0,0 {width}x{height}] (256x256) J2K|AppMag = 20|MPP = 0.5"


def stained_patch_slide(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """Glass (242 grey) with a dark purple square at ``box = (x0, y0, x1, y1)`` in pixels."""
    pixels = np.full((height, width, 3), 242, dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = (90, 40, 140)
    return pixels


def dark_centroid(pixels: np.ndarray) -> tuple[float, float]:
    """(x, y) centroid, in pixels of ``pixels``, of the pixels darker than mid-grey in red."""
    rows, cols = np.nonzero(pixels[..., 0] < 166)
    return float(cols.mean() + 0.5), float(rows.mean() + 0.5)


def write_aperio_svs(path: Path, pixels: np.ndarray, compression) -> Path:
    height, width = pixels.shape[:2]
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", compression=compression,
        description=APERIO_DESCRIPTION.format(width=width, height=height), metadata=None,
    )
    return path


def corrupt_tile(path: Path, tile_index: int) -> None:
    """Overwrite the middle of one stored tile with bytes no codec accepts."""
    with tifffile.TiffFile(path) as tiff:
        offset = tiff.pages.first.dataoffsets[tile_index]
        count = tiff.pages.first.databytecounts[tile_index]
    with path.open("r+b") as file:
        file.seek(offset + 2)
        file.write(b"\xff\x00" * ((count - 4) // 2))


# Resolution metadata.


def test_implausibly_fine_tag_resolution_rejected(tmp_path):
    # 1,000,000 pixels per centimetre is 0.01 microns per pixel, finer than any light microscope.
    path = tmp_path / "too-fine.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), tile=(32, 32), photometric="rgb", resolution=(1e6, 1e6), resolutionunit="CENTIMETER")
    for backend in BACKENDS:
        with pytest.raises(BadInputError, match=r"too-fine\.tif: resolution 0\.01 microns per pixel .*plausible.*--mpp"):
            open_slide(path, backend=backend)


# Pyramid geometry.


@pytest.fixture(scope="module")
def odd_pyramid(tmp_path_factory) -> Path:
    """A 3-level pyramid, 2001 x 1601 with levels of 500 x 400 (downsample 4.0022) and 125 x 100
    (16.0065), a dark square at level-0 x 1203-1243, y 803-843."""
    pixels = stained_patch_slide(1601, 2001, (1203, 803, 1243, 843))
    path = tmp_path_factory.mktemp("odd") / "odd-pyramid.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(pixels, tile=(256, 256), photometric="rgb", **HALF_MICRON_PER_CM)
        for width, height in ((500, 400), (125, 100)):
            level = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
            writer.write(level, tile=(64, 64), photometric="rgb", subfiletype=1, **HALF_MICRON_PER_CM)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("downsample", [1.0, 2.5, 4.0, 7.3, 16.0, 19.0])
def test_odd_downsample_reads_land_in_place(odd_pyramid, backend, downsample):
    with open_slide(odd_pyramid, backend=backend) as slide:
        assert slide.level_dimensions == ((2001, 1601), (500, 400), (125, 100))
        assert slide.level_downsamples[1] == pytest.approx(4.0022, abs=1e-4)
        mpp = slide.mpp * downsample
        width, height = slide.size_at_mpp(mpp)
        view = slide.read_region_at_mpp(0, 0, width, height, mpp)

    # The square's centre is level-0 (1223, 823); at this downsample it must be within a pixel.
    x, y = dark_centroid(view)
    assert abs(x - 1223 / downsample) <= 1.0
    assert abs(y - 823 / downsample) <= 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("downsample", [4.0, 5.5, 16.0])
def test_odd_downsample_pieces_equal_whole(odd_pyramid, backend, downsample):
    with open_slide(odd_pyramid, backend=backend) as slide:
        mpp = slide.mpp * downsample
        whole = slide.read_region_at_mpp(3, 5, 96, 80, mpp)
        pieces = np.concatenate(
            [np.concatenate([slide.read_region_at_mpp(3 + x, 5 + y, 48, 40, mpp) for x in (0, 48)], axis=1) for y in (0, 40)],
            axis=0,
        )
    assert np.array_equal(pieces, whole)


def write_pages(path: Path, pages: list[tuple[np.ndarray, dict]]) -> Path:
    with tifffile.TiffWriter(path) as writer:
        for pixels, options in pages:
            writer.write(np.ascontiguousarray(pixels), photometric="rgb", **HALF_MICRON_PER_CM, **options)
    return path


@pytest.mark.parametrize(
    ("layout", "expected_levels"),
    [
        # Reduced pages without NewSubfileType = 1 are separate images to both readers, so the
        # slide is read from level 0 alone: slower, but correct.
        pytest.param("unmarked-levels", ((1024, 768),), id="unmarked-levels"),
        pytest.param("tiled-thumbnail-between", ((1024, 768), (512, 384)), id="tiled-thumbnail-between"),
        pytest.param("stripped-thumbnail-between", ((1024, 768), (512, 384)), id="stripped-thumbnail-between"),
        # A reduced page with another aspect ratio after the levels: OpenSlide takes it as a level
        # with downsample 10.56, which the reader drops.
        pytest.param("marked-thumbnail-last", ((1024, 768), (512, 384)), id="marked-thumbnail-last"),
    ],
)
def test_thumbnail_pages_are_not_levels(tmp_path, layout, expected_levels):
    pixels = stained_patch_slide(768, 1024, (600, 300, 700, 400))
    level1 = pixels[::2, ::2]
    thumbnail = pixels[::16, ::5][:48, :200]
    pages = {
        "unmarked-levels": [(pixels, {"tile": (256, 256)}), (level1, {"tile": (256, 256)}), (pixels[::4, ::4], {"tile": (64, 64)})],
        "tiled-thumbnail-between": [(pixels, {"tile": (256, 256)}), (thumbnail, {"tile": (64, 64)}), (level1, {"tile": (256, 256), "subfiletype": 1})],
        "stripped-thumbnail-between": [(pixels, {"tile": (256, 256)}), (thumbnail, {}), (level1, {"tile": (256, 256), "subfiletype": 1})],
        "marked-thumbnail-last": [(pixels, {"tile": (256, 256)}), (level1, {"tile": (256, 256), "subfiletype": 1}), (thumbnail, {"tile": (64, 64), "subfiletype": 1})],
    }[layout]
    path = write_pages(tmp_path / f"{layout}.tif", pages)

    for backend in (None, *BACKENDS):
        with open_slide(path, backend=backend) as slide:
            assert slide.level_dimensions == expected_levels, backend
            view = slide.read_region_at_mpp(0, 0, *slide.size_at_mpp(slide.mpp * 12), slide.mpp * 12)
        # The square's centre, level-0 (650, 350), lands in place at every level choice.
        x, y = dark_centroid(view)
        assert abs(x - 650 / 12) <= 1.0, backend
        assert abs(y - 350 / 12) <= 1.0, backend


# Bounds offsets: a Leica SCN slide whose scanned region starts at level-0 (1024, 608) in a
# slide of 4000 x 3000 pixels. The square is at (320, 192)-(704, 448) of the scanned region.
SCN_BOUNDS = (1024, 608, 1024, 768)
SCN_SQUARE = (320, 192, 704, 448)


@pytest.fixture(scope="module")
def leica_scn(tmp_path_factory) -> Path:
    main = stained_patch_slide(SCN_BOUNDS[3], SCN_BOUNDS[2], SCN_SQUARE)
    return write_leica_scn(tmp_path_factory.mktemp("scn") / "offset.scn", main, SCN_BOUNDS[:2], (4000, 3000))


def test_leica_bounds_keep_full_level0_frame(leica_scn):
    bounds_x, bounds_y, bounds_width, bounds_height = SCN_BOUNDS
    x0, y0, x1, y1 = SCN_SQUARE
    with open_slide(leica_scn) as slide:
        assert slide.backend == "openslide"
        assert slide.vendor == "leica"
        assert slide.level_dimensions == ((4000, 3000), (2000, 1500))
        assert slide.mpp == 0.5
        bounds = [slide.properties[f"openslide.bounds-{name}"] for name in ("x", "y", "width", "height")]
        assert bounds == [str(value) for value in SCN_BOUNDS]
        assert slide.l0_bounds == SCN_BOUNDS
        scanned = slide.read_level_region(0, bounds_x, bounds_y, bounds_width, bounds_height)
        left_of_bounds = slide.read_level_region(0, 0, 0, bounds_x, 3000)
        above_bounds = slide.read_level_region(0, bounds_x, 0, bounds_width, bounds_y)
        level1 = slide.read_level_region(1, 0, 0, 2000, 1500)
        tissue_view = slide.read_region_at_mpp(0, 0, *slide.size_at_mpp(8.0), 8.0)

    # The square's centre lies at level-0 (1536, 928): the bounds origin plus its place in the
    # scanned region. Outside the bounds OpenSlide returns transparent pixels, read as white.
    centre_x, centre_y = bounds_x + (x0 + x1) / 2, bounds_y + (y0 + y1) / 2
    x, y = dark_centroid(scanned)
    assert abs(bounds_x + x - centre_x) <= 0.5
    assert abs(bounds_y + y - centre_y) <= 0.5
    assert (left_of_bounds == 255).all()
    assert (above_bounds == 255).all()
    x, y = dark_centroid(level1)
    assert abs(2 * x - centre_x) <= 1.0
    assert abs(2 * y - centre_y) <= 1.0
    x, y = dark_centroid(tissue_view)
    assert abs(16 * x - centre_x) <= 16
    assert abs(16 * y - centre_y) <= 16


def test_leica_rejected_by_tifffile_backend(leica_scn):
    # tifffile sees the macro and the main image as separate series without their offsets, so
    # reading either as the slide would put every pixel in the wrong place.
    with pytest.raises(BadInputError, match=r"offset\.scn is a Leica SCN slide.*openslide backend"):
        open_slide(leica_scn, backend="tifffile")


def write_sparse_slide(path: Path, height: int, width: int, tissue_tiles: set[tuple[int, int]]) -> Path:
    """A JPEG-tiled TIFF of 512-pixel tiles that stores only the tiles in ``tissue_tiles``
    (row, col) plus one white tile, at 0.5 microns per pixel."""
    tile = 512
    tissue = np.full((tile, tile, 3), (215, 120, 185), np.uint8)
    tissue[::8] = (90, 40, 140)

    def tiles():
        # tifffile takes the dtype from the first item, so it must be an array.
        yield np.full((tile, tile, 3), 255, np.uint8)
        for index in range(1, -(-height // tile) * -(-width // tile)):
            yield tissue if divmod(index, -(-width // tile)) in tissue_tiles else None

    tifffile.imwrite(path, tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="jpeg", **HALF_MICRON_PER_CM)
    return path


SPARSE_RUN = r"""
import json, re, sys
from pipeline.slide import open_slide
from tests.leica_scn import write_leica_scn
from pipeline.tissue import detect_tissue
from pipeline.tiling import TileGrid, select_tissue_tiles, write_tiles

with open_slide(sys.argv[1]) as slide:
    tissue = detect_tissue(slide)
    grid = TileGrid(*slide.size_at_mpp(0.5), 512, 64)
    m_origins = select_tissue_tiles(grid, tissue, 0.5)
    store = write_tiles(slide, grid, m_origins, 0.5, sys.argv[2], workers=2)
    print(json.dumps({
        "backend": slide.backend, "dimensions": slide.dimensions, "tiles": len(grid.m_origins()),
        "tissue_tiles": [list(map(int, origin)) for origin in m_origins],
        "tile_mean": float(store.read(0, len(store)).mean()),
        # VmHWM, not getrusage: Linux carries ru_maxrss over exec from the parent's memory.
        "peak_rss_mib": int(re.search(r"VmHWM:\s*(\d+) kB", open("/proc/self/status").read()).group(1)) // 1024,
    }))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from Linux /proc")
def test_sparse_60000_by_80000_slide_bounded_memory(tmp_path):
    # 60000 x 80000 RGB is 14.4 GB of pixels; the file stores 4 tissue tiles and is under 1 MB.
    path = write_sparse_slide(tmp_path / "sparse.tif", 80_000, 60_000, {(80, 60), (80, 61), (81, 60), (81, 61)})
    assert path.stat().st_size < 1 << 20

    # In a fresh process, so that the peak resident memory belongs to reading this slide only.
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SPARSE_RUN), str(path), str(tmp_path / "tiles.zarr")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)

    assert result["backend"] == "tifffile"
    assert result["dimensions"] == [60_000, 80_000]
    assert result["tiles"] == 134 * 179
    # The tissue is level-0 x 30720-31744, y 40960-41984; the tiles touching it start at
    # multiples of the 448-pixel stride from x 30464 and y 40320 on.
    m_xs = sorted({x for x, _ in result["tissue_tiles"]})
    m_ys = sorted({y for _, y in result["tissue_tiles"]})
    assert m_xs[0] <= 30_720 < m_xs[0] + 512
    assert m_xs[-1] < 31_744
    assert m_ys[0] <= 40_960 < m_ys[0] + 512
    assert m_ys[-1] < 41_984
    assert len(result["tissue_tiles"]) <= 16
    assert result["tile_mean"] < 240, "the tiles read must contain the stained tissue"
    # Bounded: a small fraction of the 14.4 GB image (about 300 MiB measured here).
    assert result["peak_rss_mib"] < 1024


def test_unstored_tiles_read_white(tmp_path):
    path = write_sparse_slide(tmp_path / "sparse.tif", 2048, 1536, {(2, 1)})
    for backend in BACKENDS:
        with open_slide(path, backend=backend) as slide:
            assert (slide.read_level_region(0, 0, 512, 512, 512) == 255).all(), backend
            tissue = slide.read_level_region(0, 512, 1024, 512, 512)
            assert tissue.mean() < 200, backend


# Compression and damaged tiles.


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg2000_svs_reads_exact_pixels(tmp_path, backend):
    # Aperio compression 33005 (JPEG 2000, RGB); imagecodecs writes it losslessly by default.
    pixels = stained_patch_slide(512, 768, (200, 100, 600, 400))
    path = write_aperio_svs(tmp_path / "j2k.svs", pixels, 33005)
    with open_slide(path, backend=backend) as slide:
        assert slide.vendor == "aperio"
        assert slide.mpp == 0.5
        assert np.array_equal(slide.read_level_region(0, 0, 0, 768, 512), pixels)


def ycbcr_from_rgb(pixels: np.ndarray) -> np.ndarray:
    """Full-range (JFIF) YCbCr of RGB uint8 pixels, rounded."""
    ycrcb = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2YCrCb)
    return np.ascontiguousarray(ycrcb[..., [0, 2, 1]])


def write_aperio_ycbcr_svs(path: Path, pixels: np.ndarray) -> Path:
    """Write an SVS with Aperio compression 33003: each 256-pixel tile a lossless JPEG 2000
    codestream of YCbCr components, without the multiple-component transform."""
    height, width = pixels.shape[:2]
    tiles = (
        imagecodecs.jpeg2k_encode(ycbcr_from_rgb(pixels[y : y + 256, x : x + 256]), level=0, codecformat="J2K", mct=False)
        for y in range(0, height, 256)
        for x in range(0, width, 256)
    )
    tifffile.imwrite(
        path, tiles, shape=pixels.shape, dtype=np.uint8, tile=(256, 256), photometric="rgb", compression=33003,
        description=APERIO_DESCRIPTION.format(width=width, height=height), metadata=None,
    )
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg2000_ycbcr_svs_reads_rgb(tmp_path, backend):
    # Random colours in the lower half cover the whole YCbCr range; the square and the glass are
    # the colours of a slide.
    pixels = stained_patch_slide(512, 768, (200, 100, 600, 400))
    pixels[400:] = np.random.default_rng(0).integers(0, 256, (112, 768, 3), dtype=np.uint8)
    path = write_aperio_ycbcr_svs(tmp_path / "j2k-ycbcr.svs", pixels)
    with tifffile.TiffFile(path) as tiff:
        stored = tiff.pages.first.asarray()

    with open_slide(path, backend=backend) as slide:
        assert slide.vendor == "aperio"
        assert slide.mpp == 0.5
        assert slide.l0_bounds is None
        region = slide.read_level_region(0, 0, 0, 768, 512)

    # The file stores YCbCr, so a reader that skips the conversion reads the square as
    # (66, 170, 145). Rounding to 8-bit YCbCr and back moves a sample by at most 1.
    assert np.array_equal(stored, ycbcr_from_rgb(pixels))
    assert np.abs(region.astype(np.int16) - pixels).max() <= 1
    assert np.abs(region[200, 300].astype(np.int16) - (90, 40, 140)).max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compression", [pytest.param(33005, id="jpeg2000"), pytest.param("jpeg", id="jpeg")])
def test_corrupt_tile_fails_with_location(tmp_path, backend, compression):
    pixels = stained_patch_slide(512, 768, (200, 100, 600, 400))
    path = write_aperio_svs(tmp_path / "corrupt.svs", pixels, compression)
    corrupt_tile(path, 4)  # row 1, column 1 of the 3 x 2 tile grid: level-0 x 256-512, y 256-512

    with open_slide(path, backend=backend) as slide:
        # A tile beside the corrupt one still reads (JPEG is lossy, so only nearly equal).
        good_tile = slide.read_level_region(0, 0, 0, 256, 256).astype(np.int16)
        assert np.abs(good_tile - pixels[:256, :256]).mean() < 2
        with pytest.raises(TileDecodeError, match=r"corrupt\.svs: pixels at level-0 .*failed to decode.*--fill-bad-tiles") as caught:
            slide.read_level_region(0, 0, 0, 768, 512)
    x, y, width, height = caught.value.l0_box
    assert x <= 256
    assert x + width >= 512
    assert y <= 256
    assert y + height >= 512


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_tile_filled_as_background(tmp_path, backend):
    pixels = stained_patch_slide(512, 768, (200, 100, 600, 400))
    path = write_aperio_svs(tmp_path / "corrupt.svs", pixels, 33005)
    corrupt_tile(path, 4)

    with open_slide(path, backend=backend, fill_bad_tiles=True) as slide:
        region = slide.read_level_region(0, 0, 0, 768, 512)
        # Again, to check that the failed read did not break the reader.
        again = slide.read_level_region(0, 0, 0, 768, 512)
        bad_tiles = slide.bad_tiles

    assert bad_tiles == [(256, 256, 256, 256)]
    assert (region[256:512, 256:512] == 255).all()
    good = np.ones((512, 768), dtype=bool)
    good[256:512, 256:512] = False
    assert np.array_equal(region[good], pixels[good])
    assert np.array_equal(again, region)


# Damaged and non-slide files.


def test_truncated_svs_rejected(shared_data, tmp_path):
    data = (shared_data / "slides/CMU-1-Small-Region.svs").read_bytes()
    for keep in (5_000, len(data) // 2):
        path = tmp_path / f"truncated-{keep}.svs"
        path.write_bytes(data[:keep])
        with pytest.raises(BadInputError, match=rf"truncated-{keep}\.svs: .*truncated"):
            open_slide(path)


def test_truncated_tile_data_rejected(tmp_path):
    # tifffile writes the directory first here, so the cut removes only tile data.
    path = tmp_path / "cut.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 255, (512, 512, 3), dtype=np.uint8), tile=(128, 128), photometric="rgb", **HALF_MICRON_PER_CM)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(BadInputError, match=r"cut\.tif: the file is truncated: its image data runs to byte \d+ but the file has only \d+ bytes"):
        open_slide(path)
