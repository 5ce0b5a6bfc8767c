"""Slide reading: one reader suite over the openslide and tifffile backends on real files, synthetic
TIFF files for the formats and metadata cases, and the error messages."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import tifffile

from bcseg.errors import BadInputError
from pipeline.slide import open_slide, slide_fingerprint

BACKENDS = ("openslide", "tifffile")

# (path under shared data, --mpp, level dimensions, mpp). boxes.tiff stores 72 dpi, a placeholder
# resolution, so it needs --mpp.
READER_SLIDES = [
    pytest.param("slides/CMU-1-Small-Region.svs", None, ((2220, 2967),), 0.499, id="cmu-svs"),
    pytest.param(
        "slides/CMU-1-Small-Region-pyramid.tif", None, ((2220, 2967), (1110, 1483), (555, 741)), 0.499, id="cmu-pyramid-tif"
    ),
    pytest.param(
        "slides/TCGA-A2-A0D2-roi-pyramid.svs",
        None,
        ((3391, 2418), (1695, 1209), (847, 604), (423, 302)),
        0.25,
        id="tcga-svs",
    ),
    pytest.param("fixtures/small.svs", None, ((16, 16),), 0.499, id="small-svs"),
    pytest.param("fixtures/boxes.tiff", 1.0, ((300, 250), (150, 125), (75, 62), (37, 31)), 1.0, id="boxes-tiff"),
]


def mean_abs_diff(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.int16) - second.astype(np.int16)).mean())


def write_rgb_tiff(path, pixels, **kwargs):
    tifffile.imwrite(path, pixels, photometric="rgb", **kwargs)
    return path


def gradient_rgb(height: int, width: int) -> np.ndarray:
    """An RGB image whose pixels identify their place: red = col % 256, green = row % 256."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols % 256, rows % 256, (rows + cols) % 256], axis=-1).astype(np.uint8)


# Reader suite, run over both backends on the same real files.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("relative_path", "mpp", "level_dimensions", "expected_mpp"), READER_SLIDES)
def test_reader_levels_and_mpp(shared_data, backend, relative_path, mpp, level_dimensions, expected_mpp):
    with open_slide(shared_data / relative_path, mpp=mpp, backend=backend) as slide:
        assert slide.backend == backend
        assert slide.level_dimensions == level_dimensions
        assert slide.dimensions == level_dimensions[0]
        assert slide.mpp == pytest.approx(expected_mpp, rel=1e-6)
        assert slide.level_downsamples[0] == 1.0
        for (width, height), downsample in zip(level_dimensions, slide.level_downsamples):
            expected = (level_dimensions[0][0] / width + level_dimensions[0][1] / height) / 2
            assert downsample == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("relative_path", "mpp", "level_dimensions", "expected_mpp"), READER_SLIDES)
def test_backends_read_same_pixels(shared_data, relative_path, mpp, level_dimensions, expected_mpp):
    with (
        open_slide(shared_data / relative_path, mpp=mpp, backend="openslide") as by_openslide,
        open_slide(shared_data / relative_path, mpp=mpp, backend="tifffile") as by_tifffile,
    ):
        for level, (width, height) in enumerate(level_dimensions):
            box = (level, width // 5, height // 6, max(1, width // 2), max(1, height // 2))
            expected = by_tifffile.read_level_region(*box)
            actual = by_openslide.read_level_region(*box)
            assert actual.shape == expected.shape == (box[4], box[3], 3)
            if float(by_openslide.level_downsamples[level]).is_integer():
                # Both decode JPEG with libjpeg-turbo here and agree exactly; another JPEG build
                # may round the inverse DCT differently by a level or two.
                assert np.abs(actual.astype(np.int16) - expected).max() <= 2, f"level {level}"
            else:
                # openslide reads a level whose downsample is not an integer (2.0003 here) at a
                # fractional position and interpolates, shifting pixels by up to a quarter pixel.
                # The region must still match better than the same region moved by one pixel.
                difference = mean_abs_diff(actual, expected)
                assert difference < 5, f"level {level}"
                for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    moved = by_tifffile.read_level_region(level, box[1] + dx, box[2] + dy, box[3], box[4])
                    assert difference < mean_abs_diff(actual, moved), f"level {level} moved by {(dx, dy)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_outside_is_white(shared_data, backend):
    with open_slide(shared_data / "slides/CMU-1-Small-Region-pyramid.tif", backend=backend) as slide:
        for level, (width, height) in enumerate(slide.level_dimensions):
            outside = slide.read_level_region(level, width + 10, -50, 40, 30)
            assert (outside == 255).all()

            # A region over the top-left corner: white outside, the level's pixels inside.
            region = slide.read_level_region(level, -7, -5, 40, 30)
            inside = slide.read_level_region(level, 0, 0, 33, 25)
            assert (region[:5] == 255).all()
            assert (region[:, :7] == 255).all()
            assert np.array_equal(region[5:, 7:], inside)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_region_inside_whole_level(shared_data, backend):
    with open_slide(shared_data / "slides/TCGA-A2-A0D2-roi-pyramid.svs", backend=backend) as slide:
        width, height = slide.level_dimensions[1]
        whole = slide.read_level_region(1, 0, 0, width, height)
        part = slide.read_level_region(1, 301, 77, 250, 190)
        assert np.array_equal(part, whole[77:267, 301:551])


@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_tiles_raise_bad_input(shared_data, backend):
    with open_slide(shared_data / "fixtures/unreadable.svs", backend=backend) as slide:
        with pytest.raises(BadInputError, match=r"unreadable\.svs.*damaged"):
            slide.read_level_region(0, 0, 0, 16, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slide_pickles_by_path(shared_data, backend):
    with open_slide(shared_data / "fixtures/small.svs", backend=backend) as slide:
        copy = pickle.loads(pickle.dumps(slide))
        assert copy.level_dimensions == slide.level_dimensions
        assert np.array_equal(copy.read_level_region(0, 0, 0, 16, 16), slide.read_level_region(0, 0, 0, 16, 16))
        copy.close()


# Reading at a target resolution.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mpp", [0.499, 0.7, 0.998, 1.3, 2.5, 8.0])
def test_read_at_mpp_pieces_equal_whole(shared_data, backend, mpp):
    with open_slide(shared_data / "slides/CMU-1-Small-Region-pyramid.tif", backend=backend) as slide:
        whole = slide.read_region_at_mpp(7, 11, 90, 70, mpp)
        rows = [
            np.concatenate([slide.read_region_at_mpp(7 + x, 11 + y, 30, 35, mpp) for x in (0, 30, 60)], axis=1)
            for y in (0, 35)
        ]
        assert np.array_equal(np.concatenate(rows, axis=0), whole)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_at_mpp_outside_is_white(shared_data, backend):
    with open_slide(shared_data / "slides/CMU-1-Small-Region-pyramid.tif", backend=backend) as slide:
        width, height = slide.size_at_mpp(2.0)
        assert (slide.read_region_at_mpp(width + 5, 0, 20, 20, 2.0) == 255).all()
        assert (slide.read_region_at_mpp(-40, -40, 20, 20, 2.0) == 255).all()


def test_level_choice_coarsest_at_or_finer(shared_data):
    # Downsamples of this pyramid: 1, 2.000337, 4.002024.
    with open_slide(shared_data / "slides/CMU-1-Small-Region-pyramid.tif") as slide:
        assert slide.best_level_for_downsample(0.5) == 0
        assert slide.best_level_for_downsample(1.0) == 0
        assert slide.best_level_for_downsample(1.99) == 0
        assert slide.best_level_for_downsample(2.0) == 1
        assert slide.best_level_for_downsample(3.9) == 1
        assert slide.best_level_for_downsample(4.0) == 2
        assert slide.best_level_for_downsample(100.0) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("factor", "max_mean_diff"),
    [
        pytest.param(2, 1.5, id="x2-level1"),
        pytest.param(3, 1.5, id="x3-level1"),
        pytest.param(4, 1.5, id="x4-level2"),
        # 1.25 level-2 pixels per output pixel: bilinear sampling of level 2 is only close to a
        # 5 x 5 box of level 0 (measured mean difference 4.5).
        pytest.param(5, 6.0, id="x5-level2"),
    ],
)
def test_read_at_coarser_mpp_matches_box_average(shared_data, backend, factor, max_mean_diff):
    with open_slide(shared_data / "slides/CMU-1-Small-Region-pyramid.tif", backend=backend) as slide:
        x, y, width, height = 100, 150, 120, 100
        resampled = slide.read_region_at_mpp(x, y, width, height, slide.mpp * factor)
        level0 = slide.read_level_region(0, x * factor, y * factor, width * factor, height * factor)
        box_average = level0.reshape(height, factor, width, factor, 3).mean(axis=(1, 3))
        assert np.abs(resampled - box_average).mean() < max_mean_diff


# TIFF layouts and metadata, on synthetic files.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("extrasample", "premultiplied"),
    [pytest.param("unassalpha", False, id="unassociated"), pytest.param("assocalpha", True, id="associated")],
)
def test_rgba_transparent_is_white(tmp_path, backend, extrasample, premultiplied):
    rgba = np.zeros((64, 96, 4), dtype=np.uint8)
    rgba[:, :32] = (0, 0, 0, 0)  # transparent
    rgba[:, 32:64] = (0, 0, 200, 255)  # opaque blue
    rgba[:, 64:] = (100, 0, 0, 128) if premultiplied else (200, 0, 0, 128)  # half-transparent red
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(
        path, rgba, photometric="rgb", extrasamples=[extrasample], tile=(32, 32), resolution=(20_000, 20_000), resolutionunit="CENTIMETER"
    )

    with open_slide(path, backend=backend) as slide:
        pixels = slide.read_level_region(0, 0, 0, 96, 64).astype(np.int16)
    assert (pixels[:, :32] == 255).all()
    assert (pixels[:, 32:64] == (0, 0, 200)).all()
    # 200 red at alpha 128 over white is 227 red, 127 green and blue; openslide rounds its
    # premultiplication differently by one level.
    assert np.abs(pixels[:, 64:] - (227, 127, 127)).max() <= 1


def test_stripped_tiff_reads_exact_pixels(tmp_path):
    pixels = gradient_rgb(300, 200)
    path = write_rgb_tiff(tmp_path / "stripped.tif", pixels, rowsperstrip=16, resolution=(20_000, 20_000), resolutionunit="CENTIMETER")

    with open_slide(path) as slide:
        assert slide.backend == "tifffile"
        assert slide.level_dimensions == ((200, 300),)
        assert slide.mpp == pytest.approx(0.5)
        assert np.array_equal(slide.read_level_region(0, 13, 40, 70, 50), pixels[40:90, 13:83])
        assert np.array_equal(slide.read_level_region(0, 0, 0, 200, 300), pixels)


def write_ome_pyramid(path, pixels, physical_size, unit="µm"):
    metadata = {"axes": "YXS", "PhysicalSizeX": physical_size, "PhysicalSizeY": physical_size, "PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    with tifffile.TiffWriter(path, ome=True) as writer:
        writer.write(pixels, subifds=2, photometric="rgb", tile=(64, 64), metadata=metadata)
        writer.write(pixels[::2, ::2], subfiletype=1, photometric="rgb", tile=(64, 64))
        writer.write(pixels[::4, ::4], subfiletype=1, photometric="rgb", tile=(64, 64))
    return path


def test_ome_subifd_pyramid_has_all_levels(tmp_path):
    pixels = gradient_rgb(256, 320)
    path = write_ome_pyramid(tmp_path / "pyramid.ome.tif", pixels, 0.25)

    with open_slide(path) as slide:
        assert slide.backend == "tifffile"
        assert slide.vendor == "ome"
        assert slide.level_dimensions == ((320, 256), (160, 128), (80, 64))
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.mpp == pytest.approx(0.25)
        assert slide.mpp_source == "ome.PhysicalSizeX"
        assert np.array_equal(slide.read_level_region(1, 10, 20, 30, 40), pixels[::2, ::2][20:60, 10:40])
        assert np.array_equal(slide.read_level_region(2, 0, 0, 80, 64), pixels[::4, ::4])


def test_ome_physical_size_unit_converted(tmp_path):
    path = write_ome_pyramid(tmp_path / "nanometres.ome.tif", gradient_rgb(128, 128), 500.0, unit="nm")
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("resolution", "unit"),
    [pytest.param(20_000, "CENTIMETER", id="centimeter"), pytest.param(50_800, "INCH", id="inch")],
)
def test_tiff_resolution_units(tmp_path, resolution, unit):
    path = write_rgb_tiff(tmp_path / "resolution.tif", gradient_rgb(64, 64), tile=(32, 32), resolution=(resolution, resolution), resolutionunit=unit)
    for backend in BACKENDS:
        with open_slide(path, backend=backend) as slide:
            assert slide.mpp == pytest.approx(0.5), backend
            assert slide.mpp_source == "tiff.XResolution"


@pytest.mark.parametrize(
    ("resolution", "unit"),
    [pytest.param(None, None, id="no-tags"), pytest.param(20_000, "NONE", id="unit-none"), pytest.param(1, "CENTIMETER", id="one-per-cm")],
)
def test_unknown_resolution_needs_mpp(tmp_path, resolution, unit):
    options = {} if resolution is None else {"resolution": (resolution, resolution), "resolutionunit": unit}
    path = write_rgb_tiff(tmp_path / "unknown.tif", gradient_rgb(64, 64), tile=(32, 32), **options)
    for backend in BACKENDS:
        with pytest.raises(BadInputError, match=r"unknown\.tif.*no resolution.*--mpp MICRONS"):
            open_slide(path, backend=backend)
        with open_slide(path, mpp=0.25, backend=backend) as slide:
            assert slide.mpp == 0.25
            assert slide.mpp_source == "--mpp"


def test_mpp_option_overrides_metadata(shared_data):
    with open_slide(shared_data / "slides/CMU-1-Small-Region.svs", mpp=0.5) as slide:
        assert slide.mpp == 0.5
        assert slide.mpp_source == "--mpp"


def test_implausible_mpp_rejected(shared_data):
    # boxes.tiff stores 72 dpi: 352.778 microns per pixel.
    with pytest.raises(BadInputError, match=r"boxes\.tiff.*352\.778.*plausible.*--mpp"):
        open_slide(shared_data / "fixtures/boxes.tiff")
    with pytest.raises(BadInputError, match=r"0\.01 .*--mpp.*plausible"):
        open_slide(shared_data / "fixtures/small.svs", mpp=0.01)


def test_xy_resolution_mismatch_rejected(tmp_path):
    path = write_rgb_tiff(tmp_path / "mismatch.tif", gradient_rgb(64, 64), tile=(32, 32), resolution=(20_000, 20_400), resolutionunit="CENTIMETER")
    with pytest.raises(BadInputError, match=r"mismatch\.tif.*differ by 2\.0%.*0\.5 and 0\.490196"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def test_xy_resolution_within_one_percent_accepted(tmp_path):
    path = write_rgb_tiff(tmp_path / "close.tif", gradient_rgb(64, 64), tile=(32, 32), resolution=(20_000, 20_100), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx((0.5 + 10_000 / 20_100) / 2)


def test_grayscale_16bit_rejected(tmp_path):
    path = tmp_path / "gray16.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), tile=(32, 32))
    with pytest.raises(BadInputError, match=r"gray16\.tif.*uint16.*8-bit RGB"):
        open_slide(path, mpp=0.5)


def test_fluorescence_channels_rejected(tmp_path):
    path = tmp_path / "fluorescence.ome.tif"
    tifffile.imwrite(path, np.zeros((5, 64, 64), np.uint8), photometric="minisblack", tile=(32, 32), metadata={"axes": "CYX"})
    with pytest.raises(BadInputError, match=r"fluorescence\.ome\.tif.*MINISBLACK.*not RGB"):
        open_slide(path, mpp=0.5)


# Plain images and DICOM.


def test_png_needs_mpp(shared_data):
    with pytest.raises(BadInputError, match=r"boxes\.png.*no resolution.*--mpp MICRONS"):
        open_slide(shared_data / "fixtures/boxes.png")


def test_png_with_mpp_reads_like_tiff(shared_data):
    with open_slide(shared_data / "fixtures/boxes.png", mpp=0.5) as image, open_slide(shared_data / "fixtures/boxes.tiff", mpp=0.5) as tiff:
        assert image.backend == "image"
        assert image.level_dimensions == ((300, 250),)
        assert image.mpp == 0.5
        assert image.mpp_source == "--mpp"
        assert np.array_equal(image.read_level_region(0, -3, 10, 120, 80), tiff.read_level_region(0, -3, 10, 120, 80))

        # Four pixels per output pixel: an exact 4 x 4 box average.
        boxes = image.read_level_region(0, 0, 0, 300, 248).reshape(62, 4, 75, 4, 3).mean(axis=(1, 3))
        assert np.array_equal(image.read_region_at_mpp(0, 0, 75, 62, 2.0), np.round(boxes).astype(np.uint8))


def test_dicom_folder_opens(shared_data):
    with open_slide(shared_data / "fixtures/dicom_boxes") as slide:
        assert slide.backend == "openslide"
        assert slide.vendor == "dicom"
        assert slide.level_dimensions == ((16, 16),)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.read_level_region(0, 0, 0, 16, 16).shape == (16, 16, 3)


def test_dicom_file_opens(shared_data):
    with open_slide(shared_data / "fixtures/dicom_boxes/boxes_0.dcm") as slide:
        assert slide.vendor == "dicom"
        assert slide.level_dimensions == ((16, 16),)


# Errors, one message each.


def test_not_a_slide_error(shared_data):
    with pytest.raises(BadInputError, match=r"broken\.svs is not a slide.*damaged or truncated"):
        open_slide(shared_data / "fixtures/broken.svs")


def test_unsupported_compression_error(shared_data):
    with pytest.raises(BadInputError, match=r"unopenable\.tiff: TIFF compression 52479 is not supported"):
        open_slide(shared_data / "fixtures/unopenable.tiff")


def test_empty_file_error(tmp_path):
    path = tmp_path / "empty.svs"
    path.touch()
    with pytest.raises(BadInputError, match=r"empty\.svs: the file is empty"):
        open_slide(path)


def test_missing_file_error(tmp_path):
    with pytest.raises(BadInputError, match=r"missing\.svs: slide not found"):
        open_slide(tmp_path / "missing.svs")


def test_folder_without_dicom_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a slide")
    with pytest.raises(BadInputError, match=r"is a folder but not a DICOM slide"):
        open_slide(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_permission_denied_error(shared_data, tmp_path):
    path = tmp_path / "locked.svs"
    path.write_bytes((shared_data / "fixtures/small.svs").read_bytes())
    path.chmod(0)
    with pytest.raises(BadInputError, match=r"locked\.svs: permission denied"):
        open_slide(path)


def test_unknown_backend_error(shared_data):
    with pytest.raises(ValueError, match=r"unknown slide backend 'bioformats'"):
        open_slide(shared_data / "fixtures/small.svs", backend="bioformats")


# Fingerprint.


def test_fingerprint_stable_and_sensitive(shared_data, tmp_path):
    source = shared_data / "slides/CMU-1-Small-Region.svs"
    copy = tmp_path / "copy.svs"
    data = bytearray(source.read_bytes())
    copy.write_bytes(data)
    assert slide_fingerprint(copy) == slide_fingerprint(source)
    assert slide_fingerprint(source).startswith("sha256:")

    data[-1] ^= 0xFF
    copy.write_bytes(data)
    assert slide_fingerprint(copy) != slide_fingerprint(source)


def test_fingerprint_of_dicom_folder(shared_data, tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    for member in sorted((shared_data / "fixtures/dicom_boxes").iterdir()):
        (folder / member.name).write_bytes(member.read_bytes())
    assert slide_fingerprint(folder) == slide_fingerprint(shared_data / "fixtures/dicom_boxes")

    (folder / "boxes_1.dcm").unlink()
    assert slide_fingerprint(folder) != slide_fingerprint(shared_data / "fixtures/dicom_boxes")


@pytest.mark.parametrize("backend", BACKENDS)
def test_threaded_reads_equal_serial_reads(shared_data, backend):
    from concurrent.futures import ThreadPoolExecutor

    with open_slide(shared_data / "slides/TCGA-A2-A0D2-roi-pyramid.svs", backend=backend) as slide:
        origins = [(x, y) for x in range(0, 3000, 500) for y in range(0, 2000, 500)]

        def read(origin):
            return slide.read_region_at_mpp(origin[0], origin[1], 200, 200, 0.37)

        serial = [read(origin) for origin in origins]
        with ThreadPoolExecutor(max_workers=4) as pool:
            threaded = list(pool.map(read, origins))
    for origin, expected, actual in zip(origins, serial, threaded):
        assert np.array_equal(actual, expected), origin
