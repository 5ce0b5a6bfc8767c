"""``bcseg-wsi info`` through the command-line entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bcseg.cli import EXIT_BAD_INPUT, main
from pipeline.slide import slide_fingerprint
from tests.leica_scn import write_leica_scn


def test_info_text_on_cmu_slide(shared_data, capsys):
    slide_path = shared_data / "slides/CMU-1-Small-Region.svs"
    assert main(["info", str(slide_path)]) == 0
    output = capsys.readouterr().out
    assert "2220 x 2967" in output
    assert "0.499 microns per pixel (from openslide.mpp-x)" in output
    assert "backend      openslide" in output
    assert "vendor       aperio" in output
    assert "associated   label, macro, thumbnail" in output
    assert slide_fingerprint(slide_path) in output


def test_info_json_lists_levels(shared_data, capsys):
    assert main(["info", str(shared_data / "slides/CMU-1-Small-Region-pyramid.tif"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "openslide"
    assert info["mpp"] == 0.499
    assert info["mpp_source"] == "tiff.XResolution"
    assert [(level["width"], level["height"]) for level in info["levels"]] == [(2220, 2967), (1110, 1483), (555, 741)]
    assert info["levels"][2]["downsample"] == pytest.approx((2220 / 555 + 2967 / 741) / 2)
    assert info["levels"][2]["mpp"] == pytest.approx(0.499 * info["levels"][2]["downsample"])
    assert info["fingerprint"].startswith("sha256:")


def test_info_shows_bounds_offset(tmp_path, capsys):
    scanned = np.full((256, 512, 3), 242, dtype=np.uint8)
    slide_path = write_leica_scn(tmp_path / "offset.scn", scanned, (1024, 608), (4000, 3000))

    assert main(["info", str(slide_path)]) == 0
    output = capsys.readouterr().out
    assert "4000 x 3000" in output
    assert "bounds       512 x 256 at level-0 x=1024, y=608 (the scanned area)" in output
    assert main(["info", str(slide_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["l0_bounds"] == [1024, 608, 512, 256]


def test_info_png_needs_mpp(shared_data, capsys):
    png = str(shared_data / "fixtures/boxes.png")
    assert main(["info", png]) == EXIT_BAD_INPUT
    assert "--mpp MICRONS" in capsys.readouterr().err

    assert main(["info", png, "--mpp", "0.5", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "image"
    assert info["mpp"] == 0.5
    assert info["mpp_source"] == "--mpp"


def test_info_missing_slide_exits_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "absent.svs")]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "absent.svs: slide not found" in error
    assert "Traceback" not in error
