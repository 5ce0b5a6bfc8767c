"""``bcseg-wsi run`` on every kind of unusual or bad input: the format fixtures, resolution and
pixel-format problems, blank slides, corrupt tiles, bad paths and output folders, a full disk,
pickled checkpoints and hostile names. Each run ends in a result or in exit code 2 with one
message naming the file, and never leaves a partial output folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bcseg.cli import main
from pipeline.run import COMPLETE_NAME
from tests.leica_scn import write_leica_scn
from tests.qupath_rules import check_feature_collection
from tests.test_checkpoint import CreatesFileWhenUnpickled

REPO = Path(__file__).resolve().parents[1]
HALF_MICRON_PER_CM = {"resolution": (20_000, 20_000), "resolutionunit": "CENTIMETER"}
# Tiles of 128 pixels keep the model's CPU time small; the model itself is not under test here.
SMALL_TILES = ("--tile-size", "128", "--overlap", "16")

# Every entry of the fixtures folder, the options it runs with, and the expected exit code and
# message (stderr for errors, stdout for results).
FIXTURE_OUTCOMES = {
    "boxes.png": ([], 2, r"boxes\.png: the slide has no resolution .*--mpp MICRONS"),
    "boxes.tiff": ([], 2, r"boxes\.tiff: resolution 352\.778 microns per pixel .*outside the plausible range"),
    "broken.svs": ([], 2, r"broken\.svs is not a slide that can be read"),
    "dicom_boxes": ([], 0, r"dicom_boxes: (done|no_tissue) -> "),
    "small.svs": ([], 0, r"small\.svs: (done|no_tissue) -> "),
    "small_HE_levels.tiff": ([], 2, r"small_HE_levels\.tiff: resolution 352\.858 microns per pixel .*plausible"),
    "unopenable.tiff": ([], 2, r"unopenable\.tiff: TIFF compression 52479 is not supported"),
    "unreadable.svs": ([], 2, r"unreadable\.svs: pixels at level-0 \(x=0, y=0\).*failed to decode.*--fill-bad-tiles"),
}
# Further runs of some fixtures with the option their error message names.
FIXTURE_FIXED_RUNS = {
    "boxes.png": (["--mpp", "0.5"], r"boxes\.png: (done|no_tissue) -> "),
    "boxes.tiff": (["--mpp", "0.5"], r"boxes\.tiff: (done|no_tissue) -> "),
    "small_HE_levels.tiff": (["--mpp", "0.5"], r"small_HE_levels\.tiff: (done|no_tissue) -> "),
    "unreadable.svs": (["--fill-bad-tiles"], r"unreadable\.svs: no_tissue \(partial\) -> "),
}


def run_cli(capsys, slide, out_dir, *options) -> tuple[int, str, str]:
    exit_code = main(["run", str(slide), "--out", str(out_dir), "-q", "--workers", "2", *options])
    captured = capsys.readouterr()
    return exit_code, captured.out, captured.err


def assert_clean_error(exit_code: int, err: str, out_dir: Path) -> None:
    """Exit code 2, one error line without a traceback, and nothing left in the output folder."""
    assert exit_code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def read_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


def write_tiff(path: Path, pixels: np.ndarray, **options) -> Path:
    tifffile.imwrite(path, pixels, photometric="rgb", tile=(64, 64), **{**HALF_MICRON_PER_CM, **options})
    return path


def tissue_patch(height: int, width: int) -> np.ndarray:
    """A stained pink and purple patch filling the image, as H&E tissue looks at low power."""
    pixels = np.full((height, width, 3), (215, 120, 185), dtype=np.uint8)
    pixels[::6] = (90, 40, 140)
    return pixels


# The format fixtures.


def test_fixture_table_lists_every_fixture(shared_data):
    assert sorted(path.name for path in (shared_data / "fixtures").iterdir()) == sorted(FIXTURE_OUTCOMES)


@pytest.mark.parametrize("name", sorted(FIXTURE_OUTCOMES))
def test_fixture_outcome(shared_data, tmp_path, capsys, name):
    options, expected_code, pattern = FIXTURE_OUTCOMES[name]
    out_dir = tmp_path / "out"

    exit_code, out, err = run_cli(capsys, shared_data / "fixtures" / name, out_dir, *options)

    if expected_code == 2:
        assert_clean_error(exit_code, err, out_dir)
        assert re.search(pattern, err), err
    else:
        assert exit_code == 0, err
        assert re.search(pattern, out), out
        output_dir = out_dir / Path(name).stem
        assert (output_dir / COMPLETE_NAME).exists()
        assert read_summary(output_dir)["partial"] is False


@pytest.mark.parametrize("name", sorted(FIXTURE_FIXED_RUNS))
def test_fixture_runs_with_named_option(shared_data, tmp_path, capsys, name):
    options, pattern = FIXTURE_FIXED_RUNS[name]

    exit_code, out, err = run_cli(capsys, shared_data / "fixtures" / name, tmp_path / "out", *options)

    assert exit_code == 0, err
    assert re.search(pattern, out), out


# Resolution.


@pytest.mark.slow
def test_coarse_slide_rejected_unless_upsampling_allowed(tmp_path, capsys, caplog):
    # 4 microns per pixel (25,400 / 6,350 per inch) against the model's 0.5.
    path = write_tiff(tmp_path / "coarse.tif", tissue_patch(16, 24), resolution=(6_350, 6_350), resolutionunit="INCH")

    exit_code, _, err = run_cli(capsys, path, tmp_path / "out")
    assert_clean_error(exit_code, err, tmp_path / "out")
    assert re.search(r"coarse\.tif: resolution 4 microns per pixel \(from tiff\.XResolution\) is 8\.0 times coarser.*--allow-upsample", err)

    # Tissue detection is off because 16 x 24 pixels at 4 microns is below its smallest object.
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        exit_code, out, err = run_cli(capsys, path, tmp_path / "out", "--allow-upsample", "--no-tissue-detection", *SMALL_TILES)
    assert exit_code == 0, err
    assert "coarse.tif: done" in out
    summary = read_summary(tmp_path / "out" / "coarse")
    assert summary["slide"]["mpp"] == 4.0
    assert summary["label_map"]["width_px"] == 24 * 8
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any(re.search(r"coarse\.tif: resolution 4 microns per pixel is 8\.0 times coarser .*upsampled", message) for message in warnings), warnings


def test_thumbnail_resolution_dicom_rejected(shared_data, tmp_path, capsys):
    # A DICOM slide at 30 microns per pixel, as a thumbnail-only export has.
    exit_code, _, err = run_cli(capsys, shared_data / "fixtures/dicom_boxes", tmp_path / "out", "--mpp", "30")

    assert_clean_error(exit_code, err, tmp_path / "out")
    assert re.search(r"dicom_boxes: resolution 30 microns per pixel \(from --mpp\) is 60\.0 times coarser.*check the --mpp value.*--allow-upsample", err), err


def test_ten_x_scan_runs_without_option(tmp_path, capsys):
    # 1 micron per pixel is twice the model's 0.5, the largest ratio accepted without the option.
    path = write_tiff(tmp_path / "ten-x.tif", np.full((64, 64, 3), 245, np.uint8), resolution=(10_000, 10_000))

    exit_code, out, err = run_cli(capsys, path, tmp_path / "out")

    assert exit_code == 0, err
    assert "ten-x.tif: no_tissue" in out


def test_missing_resolution_runs_with_mpp_option(tmp_path, capsys):
    path = tmp_path / "no-resolution.tif"
    tifffile.imwrite(path, tissue_patch(64, 64), photometric="rgb", tile=(32, 32))

    exit_code, _, err = run_cli(capsys, path, tmp_path / "out")
    assert_clean_error(exit_code, err, tmp_path / "out")
    assert "--mpp MICRONS" in err

    exit_code, _, err = run_cli(capsys, path, tmp_path / "out", "--mpp", "0.5")
    assert exit_code == 0, err
    summary = read_summary(tmp_path / "out" / "no-resolution")
    assert summary["slide"]["mpp"] == 0.5
    assert summary["slide"]["mpp_source"] == "--mpp"


# Geometry: slides smaller than a tile and sizes that are not tile multiples.


@pytest.mark.slow
@pytest.mark.parametrize(("width", "height"), [pytest.param(37, 23, id="smaller-than-a-tile"), pytest.param(300, 201, id="not-tile-multiple")])
def test_odd_sizes_keep_slide_frame(tmp_path, capsys, width, height):
    pixels = np.full((height, width, 3), 242, dtype=np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = tissue_patch(3 * height // 4 - height // 4, 3 * width // 4 - width // 4)
    path = write_tiff(tmp_path / "odd.tif", pixels)

    exit_code, _, err = run_cli(capsys, path, tmp_path / "out", "--no-tissue-detection", *SMALL_TILES)

    assert exit_code == 0, err
    output_dir = tmp_path / "out" / "odd"
    labels = tifffile.imread(output_dir / "labels.tif")
    assert labels.shape == (height, width)
    collection = json.loads((output_dir / "odd.geojson").read_text())
    assert check_feature_collection(collection, image_width=width, image_height=height) == []
    assert read_summary(output_dir)["label_map"] == {"width_px": width, "height_px": height, "mpp": 0.5, "l0_per_px": 1.0}


@pytest.mark.slow
def test_bounds_offset_geojson_frames(tmp_path, capsys):
    # A Leica SCN slide of 4000 x 3000 level-0 pixels whose scanned region, 1024 x 768, starts at
    # (1024, 608). Tissue fills level-0 x 1344-1728, y 800-1056, on edges of the 8-micron
    # (16-pixel) tissue-mask grid so that the mask has no partly covered pixels.
    from shapely import unary_union
    from shapely.geometry import shape

    l0_tissue = (1344, 800, 1728, 1056)
    scanned = np.full((768, 1024, 3), 242, dtype=np.uint8)
    scanned[800 - 608 : 1056 - 608, 1344 - 1024 : 1728 - 1024] = tissue_patch(256, 384)
    path = write_leica_scn(tmp_path / "offset.scn", scanned, (1024, 608), (4000, 3000))

    def covered_by_features(collection):
        return unary_union([shape(feature["geometry"]) for feature in collection["features"]])

    # Default frame: measured from the bounds' corner and within the bounds, as QuPath shows the slide.
    exit_code, _, err = run_cli(capsys, path, tmp_path / "out", *SMALL_TILES)

    assert exit_code == 0, err
    output_dir = tmp_path / "out" / "offset"
    summary = read_summary(output_dir)
    assert summary["slide"]["dimensions_px"] == [4000, 3000]
    assert summary["slide"]["l0_bounds"] == [1024, 608, 1024, 768]
    assert summary["label_map"]["l0_per_px"] == 1.0
    assert summary["settings"]["geojson_frame"] == "bounds"
    assert summary["geojson"]["frame"] == "bounds"
    assert summary["geojson"]["l0_origin"] == [1024, 608]
    complete = json.loads((output_dir / COMPLETE_NAME).read_text())
    assert complete["settings"]["geojson_l0_box"] == [1024, 608, 1024, 768]
    collection = json.loads((output_dir / "offset.geojson").read_text())
    assert check_feature_collection(collection, image_width=1024, image_height=768) == []
    covered = covered_by_features(collection)
    l0_tissue_in_bounds = (1344 - 1024, 800 - 608, 1728 - 1024, 1056 - 608)
    assert covered.bounds == pytest.approx(l0_tissue_in_bounds, abs=2)
    assert covered.area == pytest.approx(384 * 256, rel=0.02)

    # Full frame: the same regions, measured from the corner of level 0.
    exit_code, _, err = run_cli(capsys, path, tmp_path / "full", *SMALL_TILES, "--geojson-frame", "full")

    assert exit_code == 0, err
    full_dir = tmp_path / "full" / "offset"
    full_summary = read_summary(full_dir)
    assert full_summary["geojson"]["frame"] == "full"
    assert full_summary["geojson"]["l0_origin"] == [0, 0]
    assert "geojson_l0_box" not in json.loads((full_dir / COMPLETE_NAME).read_text())["settings"]
    full_collection = json.loads((full_dir / "offset.geojson").read_text())
    assert check_feature_collection(full_collection, image_width=4000, image_height=3000) == []
    full_covered = covered_by_features(full_collection)
    assert full_covered.bounds == pytest.approx(l0_tissue, abs=2)
    assert full_covered.area == pytest.approx(covered.area)
    assert full_summary["classes"] == summary["classes"]

    # Label image and tissue mask: tissue only at that place; the rest of the slide, inside the
    # bounds or outside them (transparent in OpenSlide), is background.
    labels = tifffile.imread(output_dir / "labels.tif")
    assert labels.shape == (3000, 4000)
    rows, cols = np.nonzero(labels)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == l0_tissue
    from PIL import Image

    tissue = np.asarray(Image.open(output_dir / "tissue.png")) > 0
    assert tissue.shape == (188, 250)  # 8 microns (16 level-0 pixels) per pixel
    rows, cols = np.nonzero(tissue)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == tuple(value // 16 for value in l0_tissue)

    # Overlay: the saturated pixels (tissue under class colours) sit at the tissue's place, scaled
    # to the overlay's width. The legend below the slide is left out.
    import cv2

    overlay = np.asarray(Image.open(output_dir / "overlay.png").convert("RGB"))
    scale = overlay.shape[1] / 4000
    saturated = cv2.cvtColor(np.ascontiguousarray(overlay[: round(3000 * scale)]), cv2.COLOR_RGB2HSV)[..., 1] > 60
    rows, cols = np.nonzero(saturated)
    box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert box == pytest.approx([value * scale for value in l0_tissue], abs=2)

    # Tiles: only those that touch tissue. Stride 112 puts 5 tile columns and 3 tile rows over it.
    assert summary["tiles"]["total"] == 36 * 27
    assert 15 <= summary["tiles"]["with_tissue"] <= 6 * 4


def test_geojson_frame_ignored_without_bounds(tmp_path, capsys):
    pixels = np.full((96, 128, 3), 242, dtype=np.uint8)
    pixels[24:72, 32:96] = tissue_patch(48, 64)
    path = write_tiff(tmp_path / "plain.tif", pixels)

    exit_code, _, err = run_cli(capsys, path, tmp_path / "bounds", "--no-tissue-detection", *SMALL_TILES)
    assert exit_code == 0, err
    exit_code, _, err = run_cli(capsys, path, tmp_path / "full", "--no-tissue-detection", *SMALL_TILES, "--geojson-frame", "full")
    assert exit_code == 0, err

    # The same polygons in both frames; only the random feature ids differ.
    def geometries(out_dir):
        collection = json.loads((out_dir / "plain" / "plain.geojson").read_text())
        return [(feature["properties"]["classification"]["name"], feature["geometry"]) for feature in collection["features"]]

    assert geometries(tmp_path / "bounds") != []
    assert geometries(tmp_path / "full") == geometries(tmp_path / "bounds")
    assert read_summary(tmp_path / "bounds" / "plain")["geojson"]["l0_origin"] == [0, 0]

    # Equal record keys, so a result in either frame is reused for the other.
    def record_key(out_dir):
        return json.loads((out_dir / "plain" / COMPLETE_NAME).read_text())["key"]

    assert record_key(tmp_path / "full") == record_key(tmp_path / "bounds")


# Pixel formats and content.


@pytest.mark.parametrize(
    ("name", "pixels", "options", "pattern"),
    [
        pytest.param("gray16.tif", np.zeros((64, 64), np.uint16), {"photometric": "minisblack"}, r"gray16\.tif: samples are uint16", id="16-bit-gray"),
        pytest.param("gray8.tif", np.zeros((64, 64), np.uint8), {"photometric": "minisblack"}, r"gray8\.tif: photometric interpretation is MINISBLACK", id="8-bit-gray"),
        pytest.param(
            "fluorescence.ome.tif", np.zeros((5, 64, 64), np.uint8), {"photometric": "minisblack", "metadata": {"axes": "CYX"}},
            r"fluorescence\.ome\.tif: .*not RGB; grayscale and multi-channel \(fluorescence\)", id="5-channel-fluorescence",
        ),
    ],
)
def test_non_rgb_rejected(tmp_path, capsys, name, pixels, options, pattern):
    path = tmp_path / name
    tifffile.imwrite(path, pixels, tile=(32, 32), **HALF_MICRON_PER_CM, **options)

    exit_code, _, err = run_cli(capsys, path, tmp_path / "out")

    assert_clean_error(exit_code, err, tmp_path / "out")
    assert re.search(pattern, err), err
    assert "resolution" not in err


@pytest.mark.parametrize(
    "colour",
    [
        pytest.param((255, 255, 255), id="white"),
        pytest.param((0, 0, 0), id="black"),
        pytest.param((240, 240, 236), id="blank-glass"),
        pytest.param((214, 120, 180), id="uniform-pink"),
    ],
)
def test_blank_slides_end_as_no_tissue(tmp_path, capsys, colour):
    path = write_tiff(tmp_path / "blank.tif", np.full((600, 800, 3), colour, dtype=np.uint8))

    exit_code, out, err = run_cli(capsys, path, tmp_path / "out")

    assert exit_code == 0, err
    assert "blank.tif: no_tissue -> " in out
    output_dir = tmp_path / "out" / "blank"
    assert json.loads((output_dir / "blank.geojson").read_text()) == {"type": "FeatureCollection", "features": []}
    summary = read_summary(output_dir)
    assert summary["status"] == "no_tissue"
    assert summary["tiles"]["with_tissue"] == 0
    assert summary["tissue_area_um2"] == 0


@pytest.mark.slow
def test_transparent_area_is_not_tissue(tmp_path, capsys):
    # Left half transparent (no data, stored black), right half stained tissue on glass.
    rgba = np.zeros((512, 1024, 4), dtype=np.uint8)
    rgba[:, 512:, :3] = 242
    rgba[128:384, 640:896, :3] = tissue_patch(256, 256)
    rgba[:, 512:, 3] = 255
    path = write_tiff(tmp_path / "rgba.tif", rgba, extrasamples=["unassalpha"])

    exit_code, _, err = run_cli(capsys, path, tmp_path / "out", *SMALL_TILES)

    assert exit_code == 0, err
    from PIL import Image

    tissue = np.asarray(Image.open(tmp_path / "out" / "rgba" / "tissue.png")) > 0
    half = tissue.shape[1] // 2
    assert not tissue[:, :half].any(), "transparent pixels were taken for tissue"
    assert tissue[:, half:].any()


@pytest.mark.slow
def test_corrupt_tile_fails_then_fills(tmp_path, capsys):
    from tests.test_inputs_slides import corrupt_tile, write_aperio_svs

    # Tissue over the top-left file tiles only, so that few model tiles run.
    pixels = np.full((512, 768, 3), 242, dtype=np.uint8)
    pixels[16:240, 16:496] = tissue_patch(224, 480)
    path = write_aperio_svs(tmp_path / "corrupt.svs", pixels, 33005)
    corrupt_tile(path, 4)
    out_dir = tmp_path / "out"

    exit_code, _, err = run_cli(capsys, path, out_dir)
    assert_clean_error(exit_code, err, out_dir)
    assert re.search(r"corrupt\.svs: pixels at level-0 \(x=\d+, y=\d+\), \d+ x \d+ px, .*failed to decode.*--fill-bad-tiles", err)

    exit_code, out, err = run_cli(capsys, path, out_dir, "--fill-bad-tiles", *SMALL_TILES)
    assert exit_code == 0, err
    assert "corrupt.svs: done (partial) -> " in out
    assert "1 tile(s) failed to decode and were filled as background" in out
    summary = read_summary(out_dir / "corrupt")
    assert summary["partial"] is True
    assert summary["bad_tiles"] == [{"l0_x": 256, "l0_y": 256, "l0_width": 256, "l0_height": 256}]
    assert summary["settings"]["fill_bad_tiles"] is True


# Files and paths.


def test_each_file_problem_has_its_own_message(shared_data, tmp_path, capsys, monkeypatch):
    source = shared_data / "slides/CMU-1-Small-Region.svs"
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(source.read_bytes()[:5000])
    empty = tmp_path / "empty.svs"
    empty.touch()
    folder = tmp_path / "folder.svs"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a slide")
    locked = tmp_path / "locked.svs"
    shutil.copy(shared_data / "fixtures/small.svs", locked)
    cases = {
        "not-a-slide": (shared_data / "fixtures/broken.svs", r"broken\.svs is not a slide that can be read"),
        "truncated": (truncated, r"truncated\.svs: the TIFF file has no readable image directory .*truncated"),
        "empty": (empty, r"empty\.svs: the file is empty \(0 bytes\)"),
        "folder": (folder, r"folder\.svs is a folder but not a DICOM slide"),
        "missing": (tmp_path / "missing.svs", r"missing\.svs: slide not found"),
        "permission": (locked, r"locked\.svs: permission denied; the slide cannot be read by this user"),
    }
    # These tests run as root in CI, and root reads any file, so the error the kernel returns to
    # another user (EACCES from open) is simulated for this one path.
    real_open = Path.open

    def open_as_other_user(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_as_other_user)

    messages = {}
    for case, (path, pattern) in cases.items():
        out_dir = tmp_path / f"out-{case}"
        exit_code, _, err = run_cli(capsys, path, out_dir)
        assert_clean_error(exit_code, err, out_dir)
        assert re.search(pattern, err), f"{case}: {err}"
        assert "resolution" not in err, case
        assert "--mpp" not in err, case
        messages[case] = err
    assert len(set(messages.values())) == len(cases)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_permissions_real(shared_data, tmp_path, capsys):
    locked = tmp_path / "locked.svs"
    shutil.copy(shared_data / "fixtures/small.svs", locked)
    locked.chmod(0)

    exit_code, _, err = run_cli(capsys, locked, tmp_path / "out")

    assert_clean_error(exit_code, err, tmp_path / "out")
    assert "locked.svs: permission denied" in err


def test_unicode_and_spaces_in_names(shared_data, tmp_path, capsys):
    folder = tmp_path / "Präparate 2024 (Ünterordner)"
    folder.mkdir()
    slide = folder / "Prüfung 測試 slide #1.svs"
    shutil.copy(shared_data / "fixtures/small.svs", slide)
    out_dir = tmp_path / "Ergebnisse ü 結果"

    exit_code, out, err = run_cli(capsys, slide, out_dir)

    assert exit_code == 0, err
    output_dir = out_dir / "Prüfung 測試 slide #1"
    assert f"{slide}: " in out
    assert (output_dir / COMPLETE_NAME).exists()
    assert (output_dir / "Prüfung 測試 slide #1.geojson").exists()
    assert read_summary(output_dir)["slide"]["path"] == str(slide)


def immutable_folder(path: Path) -> bool:
    """Make ``path`` immutable with chattr, which binds root too; False where that is unavailable."""
    path.mkdir()
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode == 0


def test_unwritable_output_folder(shared_data, tmp_path, capsys):
    locked = tmp_path / "locked"
    if os.geteuid() == 0:
        if not immutable_folder(locked):
            pytest.skip("running as root without chattr +i, so no folder here is unwritable")
    else:
        locked.mkdir(mode=0o500)
    try:
        exit_code, _, err = run_cli(capsys, shared_data / "fixtures/small.svs", locked)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=True)

    assert exit_code == 2
    assert re.search(r"locked: output folder is not writable; choose another --out", err), err
    assert list(locked.iterdir()) == []


def test_disk_full_keeps_earlier_result(shared_data, tmp_path, capsys, monkeypatch):
    slide = shared_data / "fixtures/small.svs"
    out_dir = tmp_path / "out"
    assert run_cli(capsys, slide, out_dir)[0] == 0
    output_dir = out_dir / "small"
    earlier = {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()}

    # A full disk cannot be made here without mounting a small file system, so the label image
    # writer is replaced by one that writes part of its file and then fails as write(2) does
    # with ENOSPC.
    import pipeline.export.label_tiff

    def write_until_disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"II*\0" + bytes(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pipeline.export.label_tiff, "write_label_tiff", write_until_disk_full)

    exit_code, _, err = run_cli(capsys, slide, out_dir, "--overwrite")

    assert exit_code == 2
    assert "Traceback" not in err
    assert re.search(r"small: the disk is full \(.*No space left on device.*\); no partial result was kept and the earlier result is unchanged", err), err
    assert [path.name for path in out_dir.iterdir()] == ["small"]
    assert {path.name: path.read_bytes() for path in output_dir.iterdir() if path.is_file()} == earlier


# Safety.


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors", "model.pth"])
def test_pickled_checkpoint_refused(shared_data, tmp_path, capsys, name):
    marker = tmp_path / "created-by-unpickling.txt"
    checkpoint = tmp_path / name
    checkpoint.write_bytes(pickle.dumps({"state_dict": CreatesFileWhenUnpickled(str(marker))}))

    exit_code, _, err = run_cli(capsys, shared_data / "fixtures/small.svs", tmp_path / "out", "--model", str(checkpoint))

    assert_clean_error(exit_code, err, tmp_path / "out")
    assert name in err
    assert not marker.exists()


def test_slide_content_cannot_move_outputs(tmp_path, capsys):
    # Names and metadata that would escape the output folder if they were used in a path.
    hostile = "../../escaped|Filename = ../../escaped|Title = /tmp/escaped|ImageID = ..\\..\\escaped"
    description = f"Aperio Image Library v12.0.5\r\n64x64 [0,0 64x64] (64x64) JPEG|AppMag = 20|MPP = 0.5|{hostile}"
    slides = tmp_path / "slides"
    slides.mkdir()
    paths = [slides / "..svs", slides / "-rf $(touch pwned).svs", slides / "a;b`c`.svs"]
    for path in paths:
        tifffile.imwrite(path, tissue_patch(64, 64), photometric="rgb", tile=(64, 64), description=description, metadata=None)
    out_dir = tmp_path / "deep" / "out"
    before = sorted(str(path) for path in tmp_path.rglob("*"))

    for path in paths:
        exit_code, _, err = run_cli(capsys, path, out_dir)
        assert exit_code == 0, err

    assert sorted(path.name for path in out_dir.iterdir()) == ["-rf $(touch pwned)", "a;b`c`", "slide"]
    created = sorted(set(str(path) for path in tmp_path.rglob("*")) - set(before))
    assert all(path.startswith(str(tmp_path / "deep")) for path in created), created
    assert not (REPO / "pwned").exists()
    assert not Path("pwned").exists()


def test_no_shell_used_for_paths():
    # File names never pass through a shell: no shell=True, os.system or os.popen in the code.
    pattern = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(")
    offenders = [
        str(path.relative_to(REPO))
        for package in ("bcseg", "pipeline", "workflows")
        for path in (REPO / package).rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
