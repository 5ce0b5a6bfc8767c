"""Label TIFF and overlay PNG: read back with tifffile, OpenSlide and PIL, on real BCSS masks."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image

from bcseg.classes import CLASSES, IGNORE_INDEX, code_lookup_table
from pipeline.export.label_tiff import level_shapes, palette_colormap, write_label_tiff
from pipeline.export.overlay import blend_labels, downsample_labels, draw_legend, write_overlay
from tests.arrays import RecordingArray

REAL_MASK = "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500.png"  # 2467 x 3394, codes 1 2 3 4 9


@pytest.fixture(scope="module")
def real_labels(shared_data) -> np.ndarray:
    """A real BCSS mask mapped to label values 0..5."""
    targets = code_lookup_table().astype(np.int16)
    labels_by_code = np.where(targets == IGNORE_INDEX, 0, targets + 1).astype(np.uint8)
    return labels_by_code[np.array(Image.open(shared_data / "bcss" / "masks_only" / REAL_MASK))]


@pytest.fixture(scope="module")
def real_tiff(real_labels, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiff") / "labels.tif"
    result = write_label_tiff(path, real_labels, mpp=0.5)
    return path, result


# ---------------------------------------------------------------------------------------------
# Label TIFF


def test_level_shapes_halve_below_512():
    assert level_shapes(2467, 3394) == [(2467, 3394), (1234, 1697), (617, 849), (309, 425)]
    assert level_shapes(511, 300) == [(511, 300)]
    assert level_shapes(512, 10) == [(512, 10), (256, 5)]


def test_tiff_levels_hold_every_second_pixel(real_labels, real_tiff):
    path, result = real_tiff
    with tifffile.TiffFile(path) as tiff:
        [series] = tiff.series
        assert len(series.levels) == 4
        for level, stored in enumerate(series.levels):
            step = 2**level
            assert np.array_equal(stored.asarray(), real_labels[::step, ::step]), f"level {level}"
    assert result["level_sizes"] == [(3394, 2467), (1697, 1234), (849, 617), (425, 309)]


def test_tiff_tags(real_tiff):
    path, _ = real_tiff
    with tifffile.TiffFile(path) as tiff:
        for level, page in enumerate(tiff.pages):
            assert page.is_tiled
            assert (page.tilewidth, page.tilelength) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
            assert page.subfiletype == (1 if level else 0)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            pixels_per_cm = 1e4 / (0.5 * 2**level)
            assert page.get_resolution() == pytest.approx((pixels_per_cm, pixels_per_cm), rel=1e-6)
        assert np.array_equal(tiff.pages[0].colormap, palette_colormap())


def test_palette_has_class_colours():
    colormap = palette_colormap()
    assert colormap.shape == (3, 256)
    assert colormap.dtype == np.uint16
    assert tuple(colormap[:, 0]) == (0, 0, 0)
    for tissue_class in CLASSES:
        assert tuple(colormap[:, tissue_class.label] // 257) == tissue_class.color


def test_tiff_reads_in_openslide(real_labels, real_tiff):
    path, result = real_tiff
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 4
        assert slide.level_dimensions == tuple(result["level_sizes"])
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))

    palette = np.zeros((256, 3), np.uint8)
    for tissue_class in CLASSES:
        palette[tissue_class.label] = tissue_class.color
    assert np.array_equal(region, palette[real_labels])


def test_tiff_from_zarr_equals_numpy(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES) + 1, (700, 530), dtype=np.uint8)
    stored = zarr.create_array(store={}, shape=labels.shape, chunks=(300, 300), dtype="uint8")
    stored[:] = labels
    write_label_tiff(tmp_path / "numpy.tif", labels, mpp=1.0)
    write_label_tiff(tmp_path / "zarr.tif", stored, mpp=1.0)

    with tifffile.TiffFile(tmp_path / "numpy.tif") as from_numpy, tifffile.TiffFile(tmp_path / "zarr.tif") as from_zarr:
        assert len(from_zarr.series[0].levels) == 2
        for level_numpy, level_zarr in zip(from_numpy.series[0].levels, from_zarr.series[0].levels):
            assert np.array_equal(level_zarr.asarray(), level_numpy.asarray())
    assert not any(path.name.endswith(".tmp") for path in tmp_path.iterdir())


def test_tiff_reads_bands_of_tile_rows(tmp_path, real_labels):
    recorded = RecordingArray(real_labels)
    write_label_tiff(tmp_path / "labels.tif", recorded, mpp=0.5)
    # Each of the 4 levels is read at most 4 tile rows (1024 rows) at a time.
    assert max(rows for rows, _ in recorded.read_shapes) == 1024
    assert sum(rows for rows, _ in recorded.read_shapes) == 2467 + 1234 + 617 + 309


def test_tiff_single_small_level(tmp_path):
    labels = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20) % 6
    write_label_tiff(tmp_path / "labels.tif", labels, mpp=2.0)
    with tifffile.TiffFile(tmp_path / "labels.tif") as tiff:
        assert len(tiff.pages) == 1
        assert np.array_equal(tiff.pages[0].asarray(), labels)


def test_tiff_rejects_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="labels must be 2-D"):
        write_label_tiff(tmp_path / "labels.tif", np.zeros((2, 2, 2), np.uint8), mpp=1.0)
    with pytest.raises(ValueError, match=r"labels must be 0\.\.255"):
        write_label_tiff(tmp_path / "labels.tif", np.full((4, 4), 300, np.int16), mpp=1.0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Overlay


def test_downsample_samples_pixel_centres(real_labels):
    out_height, out_width = 123, 170
    small = downsample_labels(real_labels, out_width, out_height, band_rows=100)

    rows = np.floor((np.arange(out_height) + 0.5) * real_labels.shape[0] / out_height).astype(int)
    cols = np.floor((np.arange(out_width) + 0.5) * real_labels.shape[1] / out_width).astype(int)
    assert small.shape == (out_height, out_width)
    assert np.array_equal(small, real_labels[np.ix_(rows, cols)])


def test_downsample_exact_factor_and_zarr(real_labels):
    labels = real_labels[:2400, :3200]
    stored = zarr.create_array(store={}, shape=labels.shape, chunks=(512, 512), dtype="uint8")
    stored[:] = labels
    small = downsample_labels(stored, 400, 300, band_rows=333)
    assert np.array_equal(small, labels[4::8, 4::8])


def test_downsample_reads_bands(real_labels):
    recorded = RecordingArray(real_labels)
    downsample_labels(recorded, 300, 200, band_rows=256)
    assert max(rows for rows, _ in recorded.read_shapes) <= 256


def test_downsample_band_rows_invariant(real_labels):
    whole = downsample_labels(real_labels, 300, 200, band_rows=10**6)
    for band_rows in (1, 7, 500):
        assert np.array_equal(downsample_labels(real_labels, 300, 200, band_rows=band_rows), whole), f"band_rows={band_rows}"


def test_blend_colours_only_labelled_pixels():
    thumbnail = np.full((4, 5, 3), 100, np.uint8)
    labels = np.zeros((4, 5), np.uint8)
    labels[1, 2] = 1  # tumour (200, 0, 0)
    labels[3, 4] = 2  # stroma (150, 200, 150)
    blended = blend_labels(thumbnail, labels, alpha=0.5)

    assert tuple(blended[1, 2]) == (150, 50, 50)
    assert tuple(blended[3, 4]) == (125, 150, 125)
    unchanged = labels == 0
    assert np.array_equal(blended[unchanged], thumbnail[unchanged])


def test_overlay_png(tmp_path, real_labels):
    out_height, out_width = 247, 339
    small = downsample_labels(real_labels, out_width, out_height)
    # A grey gradient serves as the slide thumbnail.
    thumbnail = np.repeat(np.linspace(60, 240, out_width, dtype=np.uint8)[None, :, None], out_height, axis=0).repeat(3, axis=2)
    size = write_overlay(tmp_path / "overlay.png", thumbnail, small, alpha=0.4)

    overlay = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB"))
    assert overlay.shape[1] == out_width
    assert overlay.shape[0] > out_height  # the legend sits below the image
    assert size == (overlay.shape[1], overlay.shape[0])
    image = overlay[:out_height]
    assert np.array_equal(image, blend_labels(thumbnail, small, alpha=0.4))

    # Pixels of the coloured classes lose their grey (necrosis is grey itself), and background keeps it.
    grey = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2])
    assert not grey[np.isin(small, [1, 2, 3, 5])].any()
    assert grey[small == 0].all()

    # Every class has a swatch of its exact colour in the legend.
    legend = overlay[out_height:]
    for tissue_class in CLASSES:
        assert (legend == tissue_class.color).all(axis=2).sum() >= 49, tissue_class.name


@pytest.mark.parametrize("width", [120, 400, 1600])
def test_legend_shows_every_class(width):
    legend = np.asarray(draw_legend(width))
    assert legend.shape[1] == width
    for tissue_class in CLASSES:
        assert (legend == tissue_class.color).all(axis=2).sum() >= 100, tissue_class.name


def test_legend_wraps_when_narrow():
    assert draw_legend(120).height > draw_legend(1600).height


def test_overlay_rejects_mismatched_sizes(tmp_path):
    with pytest.raises(ValueError, match="must match the thumbnail"):
        write_overlay(tmp_path / "overlay.png", np.zeros((10, 10, 3), np.uint8), np.zeros((5, 10), np.uint8))
    assert list(tmp_path.iterdir()) == []
