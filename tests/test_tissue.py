"""Tissue detection on real slides and synthetic images, and the TissueMask geometry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.slide import open_slide
from pipeline.tissue import TissueMask, detect_tissue, tissue_mpp, write_tissue_png


def write_png(path, pixels: np.ndarray):
    Image.fromarray(pixels).save(path)
    return path


def test_cmu_tissue_fraction_and_place(shared_data):
    with open_slide(shared_data / "slides/CMU-1-Small-Region.svs") as slide:
        tissue = detect_tissue(slide)
    # 2220 x 2967 pixels at 0.499 microns per pixel, viewed at 8 microns per pixel.
    assert tissue.mpp == 8.0
    assert tissue.mask.shape == (186, 139)
    assert tissue.mask.dtype == bool
    # Checked by eye: one strip of tissue over the middle and lower part, about a third of the area.
    assert 0.25 < tissue.tissue_fraction < 0.45
    assert not tissue.mask[:20, :20].any(), "top-left glass"
    assert not tissue.mask[:20, -20:].any(), "top-right glass"
    assert tissue.mask[120:130, 60:70].all(), "middle of the tissue strip"
    assert not tissue.mask[100:110, 40:50].any(), "glass left of the strip"
    assert tissue.area_um2 == pytest.approx(tissue.mask.sum() * 64.0)


def test_region_full_of_tissue(shared_data):
    # A BCSS region of interest: tissue from edge to edge, pale and dark parts alike.
    with open_slide(shared_data / "slides/TCGA-A2-A0D2-roi-pyramid.svs") as slide:
        tissue = detect_tissue(slide)
    assert tissue.tissue_fraction > 0.95


@pytest.mark.parametrize(
    "colour",
    [
        pytest.param((255, 255, 255), id="white"),
        pytest.param((0, 0, 0), id="black"),
        pytest.param((236, 236, 232), id="off-white-glass"),
        pytest.param((214, 120, 180), id="uniform-pink"),
        pytest.param((128, 128, 128), id="uniform-gray"),
    ],
)
def test_blank_slides_have_no_tissue(tmp_path, colour):
    path = write_png(tmp_path / "blank.png", np.full((400, 500, 3), colour, dtype=np.uint8))
    with open_slide(path, mpp=2.0) as slide:
        tissue = detect_tissue(slide)
    assert tissue.mask.shape == (100, 125)
    assert not tissue.mask.any()


def test_white_with_noise_has_no_tissue(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(240, 6, (400, 500, 3)), 0, 255).astype(np.uint8)
    with open_slide(write_png(tmp_path / "noise.png", pixels), mpp=2.0) as slide:
        assert not detect_tissue(slide).mask.any()


def test_stained_square_on_glass_found(tmp_path):
    # A 200 x 160 pixel pink and purple patch at 2 microns per pixel: 50 x 40 mask pixels at 8.
    pixels = np.full((400, 500, 3), 242, dtype=np.uint8)
    pixels[80:240, 120:320] = (215, 120, 185)
    pixels[80:240:8, 120:320:8] = (90, 40, 140)
    # A black border and a speck of dust that must not count.
    pixels[:, :12] = 0
    pixels[350:354, 450:454] = (120, 60, 150)
    with open_slide(write_png(tmp_path / "square.png", pixels), mpp=2.0) as slide:
        tissue = detect_tissue(slide)

    expected = np.zeros((100, 125), dtype=bool)
    expected[20:60, 30:80] = True
    mismatched = np.count_nonzero(tissue.mask != expected)
    assert mismatched <= 4, f"{mismatched} pixels differ"
    assert not tissue.mask[:, :3].any(), "black border"
    assert not tissue.mask[85:90, 110:115].any(), "dust"


def test_small_hole_filled_large_hole_kept(tmp_path):
    # Tissue ring at 8 microns per pixel: a 3 x 3 pixel hole (576 um2) is filled, a
    # 60 x 60 hole (0.23 mm2) stays glass.
    pixels = np.full((200, 300, 3), 242, dtype=np.uint8)
    pixels[20:180, 20:280] = (215, 120, 185)
    pixels[50:53, 50:53] = 242
    pixels[70:130, 150:210] = 242
    with open_slide(write_png(tmp_path / "holes.png", pixels), mpp=8.0) as slide:
        tissue = detect_tissue(slide)
    assert tissue.mask[50:53, 50:53].all()
    assert not tissue.mask[75:125, 155:205].any()


def test_tissue_mpp_rules(tmp_path, shared_data):
    with open_slide(shared_data / "slides/CMU-1-Small-Region.svs") as slide:
        assert tissue_mpp(slide) == 8.0
    # Long side 5000 px at 10 microns: 50000 microns over 4096 pixels.
    with open_slide(write_png(tmp_path / "long.png", np.full((20, 5000, 3), 255, np.uint8)), mpp=10.0) as slide:
        assert tissue_mpp(slide) == pytest.approx(50_000 / 4096)
    # Never finer than the slide itself.
    with open_slide(write_png(tmp_path / "coarse.png", np.full((20, 30, 3), 255, np.uint8)), mpp=20.0) as slide:
        assert tissue_mpp(slide) == 20.0


def test_full_mask_covers_slide(shared_data):
    with open_slide(shared_data / "slides/CMU-1-Small-Region.svs") as slide:
        tissue = TissueMask.full(slide)
    assert tissue.mask.shape == (186, 139)
    assert tissue.mask.all()
    assert tissue.covers(0, 0, 1, 1, 0.499)


def hand_made_mask() -> TissueMask:
    # One tissue pixel at row 3, col 5, 8 microns per pixel: x in [40, 48), y in [24, 32) microns,
    # which is x in [20, 24), y in [12, 16) at 2 microns per pixel.
    mask = np.zeros((10, 10), dtype=bool)
    mask[3, 5] = True
    return TissueMask(mask, 8.0)


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        pytest.param((20, 12, 4, 4), True, id="exactly-the-pixel"),
        pytest.param((0, 0, 21, 13), True, id="overlaps-corner"),
        pytest.param((23, 15, 100, 100), True, id="overlaps-from-inside"),
        pytest.param((24, 12, 4, 4), False, id="right-neighbour"),
        pytest.param((16, 12, 4, 4), False, id="ends-on-left-edge"),
        pytest.param((20, 8, 4, 4), False, id="ends-on-top-edge"),
        pytest.param((17, 12, 4, 4), True, id="crosses-left-edge"),
        pytest.param((-50, -50, 71, 63), True, id="starts-outside"),
        pytest.param((200, 0, 10, 10), False, id="right-of-slide"),
        pytest.param((20, 12, 0, 4), False, id="empty-box"),
    ],
)
def test_covers_hand_made_mask(box, expected):
    assert hand_made_mask().covers(*box, 2.0) is expected


def test_covers_at_coarser_resolution():
    # At 16 microns per pixel the tissue pixel lies in [32, 48) x [16, 32) microns: box (2, 1).
    tissue = hand_made_mask()
    assert tissue.covers(2, 1, 1, 1, 16.0)
    assert not tissue.covers(1, 1, 1, 1, 16.0)
    assert not tissue.covers(3, 1, 1, 1, 16.0)


def test_resized_to_nearest_neighbour():
    mask = np.array([[True, False], [False, True]])
    resized = TissueMask(mask, 8.0).resized_to(4, 6)
    assert resized.shape == (6, 4)
    assert resized.dtype == bool
    expected = np.zeros((6, 4), dtype=bool)
    expected[:3, :2] = True
    expected[3:, 2:] = True
    assert np.array_equal(resized, expected)

    shrunk = TissueMask(np.kron(mask, np.ones((3, 3), bool)), 8.0).resized_to(2, 2)
    assert np.array_equal(shrunk, mask)


def test_write_tissue_png(tmp_path):
    tissue = hand_made_mask()
    path = tmp_path / "tissue.png"
    write_tissue_png(tissue, path)
    with Image.open(path) as image:
        assert image.mode == "L"
        assert image.info["dpi"] == pytest.approx((25_400 / 8.0, 25_400 / 8.0), rel=1e-3)
        pixels = np.asarray(image)
    assert np.array_equal(pixels == 255, tissue.mask)
    assert set(np.unique(pixels)) == {0, 255}
