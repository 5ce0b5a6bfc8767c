"""GeoJSON export: QuPath's rules, exact round trips on real BCSS masks, band-border merging."""

from __future__ import annotations

import copy
import gzip
import json
import math

import cv2
import numpy as np
import pytest
import rasterio.features
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
import shapely
import zarr
from affine import Affine
from PIL import Image
from shapely.geometry import shape

from bcseg.classes import CLASSES, IGNORE_INDEX, code_lookup_table
from pipeline.export.geojson import write_geojson
from tests.arrays import RecordingArray
from tests.qupath_rules import check_feature_collection, load_feature_collection

LABEL_BY_QUPATH_NAME = {tissue_class.qupath_name: tissue_class.label for tissue_class in CLASSES}
# Real masks with varied shapes. The last two contain code 0 (outside the annotated region).
REAL_MASKS = [
    "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500.png",
    "TCGA-AR-A0U1-DX1_xmin63681_ymin24922_MPP-0.2500.png",
    "TCGA-D8-A27M-DX1_xmin54473_ymin16109_MPP-0.2500.png",
    "TCGA-E9-A5FL-DX1_xmin45595_ymin47283_MPP-0.2500.png",
]
MASK_STEP = 4  # nearest-neighbour downsampling of the real masks, to keep the tests fast


def class_labels_from_codes(codes: np.ndarray) -> np.ndarray:
    """Map BCSS codes to label-map values: 1..5 for the classes, 0 for ignored codes."""
    targets = code_lookup_table().astype(np.int16)
    labels_by_code = np.where(targets == IGNORE_INDEX, 0, targets + 1).astype(np.uint8)
    return labels_by_code[codes]


@pytest.fixture(scope="module", params=REAL_MASKS, ids=lambda name: name[:12])
def real_labels(request, shared_data) -> np.ndarray:
    codes = np.array(Image.open(shared_data / "bcss" / "masks_only" / request.param))
    return class_labels_from_codes(codes[::MASK_STEP, ::MASK_STEP])


def export(tmp_path, labels, name="regions.geojson", l0_per_px=1.0, mpp=0.5, **options):
    path = tmp_path / name
    counts = write_geojson(path, labels, l0_per_px, mpp, **options)
    return load_feature_collection(path), counts


def rasterize(collection: dict, m_shape: tuple[int, int], l0_per_px: float) -> np.ndarray:
    """Burn the features back into a label map at model resolution.

    The transform maps model pixel (col, row) to level-0 (col * s, row * s), so a model pixel gets
    the label of the polygon that contains its centre in level-0 coordinates.
    """
    shapes = [
        (feature["geometry"], LABEL_BY_QUPATH_NAME[feature["properties"]["classification"]["name"]])
        for feature in collection["features"]
    ]
    if not shapes:
        return np.zeros(m_shape, np.uint8)
    return rasterio.features.rasterize(shapes, out_shape=m_shape, transform=Affine.scale(l0_per_px), fill=0, dtype=np.uint8)


def geometry_set(collection: dict) -> list[tuple[str, str]]:
    """Class name and normalized WKT of every feature, sorted, to compare exports."""
    return sorted(
        (feature["properties"]["classification"]["name"], shapely.normalize(shape(feature["geometry"])).wkt)
        for feature in collection["features"]
    )


def region_count(labels: np.ndarray) -> int:
    """Number of 4-connected regions over all classes."""
    total = 0
    for label in range(1, len(CLASSES) + 1):
        count, _ = cv2.connectedComponents((labels == label).astype(np.uint8), connectivity=4)
        total += count - 1
    return total


def blob_labels(seed: int, rows: int = 120, cols: int = 90) -> np.ndarray:
    """Blocky random classes with 5 % single-pixel noise: many regions, holes and corner contacts."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, len(CLASSES) + 1, (rows // 10, cols // 10), dtype=np.uint8)
    labels = np.kron(coarse, np.ones((10, 10), np.uint8))
    noise = rng.random(labels.shape) < 0.05
    labels[noise] = rng.integers(0, len(CLASSES) + 1, noise.sum())
    return labels


# ---------------------------------------------------------------------------------------------
# The rule checker itself


def good_feature() -> dict:
    return {
        "type": "Feature",
        "id": "0b6f0c38-5f5e-4f0e-9d0a-3c1f2f1a9b11",
        "geometry": {
            "type": "Polygon",
            "coordinates": [
                [[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0], [0.0, 0.0]],
                [[2.0, 2.0], [2.0, 4.0], [4.0, 4.0], [4.0, 2.0], [2.0, 2.0]],
            ],
        },
        "properties": {
            "objectType": "annotation",
            "classification": {"name": "Tumor", "color": [200, 0, 0]},
            "measurements": {"Area um^2": 96.0, "Mean probability": "NaN"},
        },
    }


def with_change(change) -> dict:
    feature = copy.deepcopy(good_feature())
    change(feature)
    return feature


BAD_FEATURES = [
    pytest.param(lambda f: f.update(id="region-1"), "UUID", id="id-not-uuid"),
    pytest.param(lambda f: f.pop("id"), "UUID", id="id-missing"),
    pytest.param(lambda f: f["properties"].pop("objectType"), "objectType", id="object-type-missing"),
    pytest.param(lambda f: f.update(objectType=f["properties"].pop("objectType")), "outside properties", id="object-type-outside"),
    pytest.param(lambda f: f["properties"].update(objectType="region"), "objectType", id="object-type-unknown"),
    pytest.param(lambda f: f["properties"].pop("classification"), "classification", id="classification-missing"),
    pytest.param(lambda f: f["properties"]["classification"].pop("color"), "color", id="color-missing"),
    pytest.param(lambda f: f["properties"]["classification"].update(color=[200.0, 0, 0]), "color", id="color-float"),
    pytest.param(lambda f: f["properties"]["classification"].update(color=[200, 0]), "color", id="color-two-values"),
    pytest.param(lambda f: f["properties"]["classification"].update(name=""), "name", id="name-empty"),
    pytest.param(lambda f: f["geometry"].update(type="LineString"), "Polygon or MultiPolygon", id="line-string"),
    pytest.param(lambda f: f["geometry"]["coordinates"][0].pop(), "not closed", id="ring-open"),
    pytest.param(lambda f: f["geometry"].update(coordinates=[[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]), "fewer than 4", id="ring-short"),
    pytest.param(lambda f: f["geometry"]["coordinates"][0].reverse(), "shell is not counter-clockwise", id="shell-clockwise"),
    pytest.param(lambda f: f["geometry"]["coordinates"][1].reverse(), "hole is not clockwise", id="hole-counter-clockwise"),
    pytest.param(
        lambda f: f["geometry"].update(coordinates=[[[0.0, 0.0], [10.0, 10.0], [10.0, 0.0], [0.0, 10.0], [0.0, 0.0]]]),
        "invalid geometry",
        id="bow-tie",
    ),
    pytest.param(lambda f: f["geometry"]["coordinates"][0][1].__setitem__(0, 10.004), "decimals", id="three-decimals"),
    pytest.param(lambda f: f["properties"]["measurements"].update(Area="large"), "measurement", id="measurement-text"),
    pytest.param(lambda f: f["properties"]["measurements"].update(Area=math.inf), "measurement", id="measurement-inf"),
]


def test_rules_accept_good_feature():
    collection = {"type": "FeatureCollection", "features": [good_feature()]}
    assert check_feature_collection(collection, image_width=10, image_height=10) == []


@pytest.mark.parametrize(("change", "expected"), BAD_FEATURES)
def test_rules_reject_bad_feature(change, expected):
    collection = {"type": "FeatureCollection", "features": [with_change(change)]}
    problems = check_feature_collection(collection)
    assert problems, "the checker accepted a feature that breaks a rule"
    assert any(expected in problem for problem in problems), problems


def test_rules_reject_outside_image():
    collection = {"type": "FeatureCollection", "features": [good_feature()]}
    problems = check_feature_collection(collection, image_width=9.5, image_height=10)
    assert any("outside the image" in problem for problem in problems), problems


def test_rules_reject_non_collection():
    assert check_feature_collection(good_feature()) == ["top level is not a FeatureCollection object"]
    assert check_feature_collection({"type": "FeatureCollection"}) == ["FeatureCollection has no 'features' list"]


# ---------------------------------------------------------------------------------------------
# Real label maps


@pytest.fixture(scope="module")
def real_export(real_labels, tmp_path_factory):
    """Export of a real mask in bands of 128 rows, so many regions cross band borders."""
    mpp = 0.5
    path = tmp_path_factory.mktemp("real") / "regions.geojson"
    counts = write_geojson(path, real_labels, 1.0, mpp, band_rows=128)
    return load_feature_collection(path), counts, mpp


def test_real_mask_follows_rules(real_labels, real_export):
    collection, _, _ = real_export
    rows, cols = real_labels.shape
    assert check_feature_collection(collection, image_width=cols, image_height=rows) == []


def test_real_mask_round_trip_exact(real_labels, real_export):
    collection, counts, _ = real_export
    assert counts["feature_count"] == region_count(real_labels)
    restored = rasterize(collection, real_labels.shape, 1.0)
    assert np.array_equal(restored, real_labels), f"{np.mean(restored != real_labels):.6%} of pixels differ"


def test_real_mask_area_per_class(real_labels, real_export):
    _, counts, mpp = real_export
    for tissue_class in CLASSES:
        expected = np.count_nonzero(real_labels == tissue_class.label) * mpp * mpp
        assert counts["area_um2_per_class"][tissue_class.name] == pytest.approx(expected)


def test_real_mask_band_rows_invariant(tmp_path, real_labels, real_export):
    banded, _, mpp = real_export
    whole, _ = export(tmp_path, real_labels, mpp=mpp, band_rows=10**6)
    assert geometry_set(banded) == geometry_set(whole)


def test_real_mask_scaled_round_trip(tmp_path, real_labels):
    # A slide of whole level-0 pixels whose label map, rounded up, reaches past its right and bottom edges.
    l0_per_px = 2.004
    rows, cols = real_labels.shape
    l0_width, l0_height = math.floor(cols * l0_per_px), math.floor(rows * l0_per_px)
    collection, _ = export(tmp_path, real_labels, l0_per_px=l0_per_px, band_rows=100, l0_image_size=(l0_width, l0_height))

    assert check_feature_collection(collection, image_width=l0_width, image_height=l0_height) == []
    restored = rasterize(collection, real_labels.shape, l0_per_px)
    assert np.array_equal(restored, real_labels), f"{np.mean(restored != real_labels):.6%} of pixels differ"


def test_real_mask_simplify_stays_valid(tmp_path, shared_data):
    codes = np.array(Image.open(shared_data / "bcss" / "masks_only" / REAL_MASKS[0]))
    labels = class_labels_from_codes(codes[::MASK_STEP, ::MASK_STEP])
    exact, _ = export(tmp_path, labels, name="exact.geojson", mpp=1.0)
    simplified, _ = export(tmp_path, labels, name="simplified.geojson", mpp=1.0, simplify_um=1.5)
    rows, cols = labels.shape

    assert check_feature_collection(simplified, image_width=cols, image_height=rows) == []
    assert len(simplified["features"]) == len(exact["features"])
    exact_vertices = sum(len(shapely.get_coordinates(shape(f["geometry"]))) for f in exact["features"])
    simplified_vertices = sum(len(shapely.get_coordinates(shape(f["geometry"]))) for f in simplified["features"])
    assert simplified_vertices < 0.8 * exact_vertices
    restored = rasterize(simplified, labels.shape, 1.0)
    assert np.mean(restored == labels) > 0.95


def test_zarr_input_equals_numpy(tmp_path, shared_data):
    codes = np.array(Image.open(shared_data / "bcss" / "masks_only" / REAL_MASKS[0]))
    labels = class_labels_from_codes(codes[::MASK_STEP, ::MASK_STEP])
    stored = zarr.create_array(store={}, shape=labels.shape, chunks=(128, 128), dtype="uint8")
    stored[:] = labels
    probabilities = np.random.default_rng(1).random((len(CLASSES), *labels.shape), dtype=np.float32)
    stored_probabilities = zarr.create_array(store={}, shape=probabilities.shape, chunks=(1, 128, 128), dtype="float32")
    stored_probabilities[:] = probabilities

    from_numpy, _ = export(tmp_path, labels, name="numpy.geojson", probabilities=probabilities, band_rows=200)
    from_zarr, _ = export(tmp_path, stored, name="zarr.geojson", probabilities=stored_probabilities, band_rows=200)
    assert geometry_set(from_zarr) == geometry_set(from_numpy)
    means_numpy = sorted(f["properties"]["measurements"]["Mean probability"] for f in from_numpy["features"])
    means_zarr = sorted(f["properties"]["measurements"]["Mean probability"] for f in from_zarr["features"])
    assert means_zarr == pytest.approx(means_numpy)


# ---------------------------------------------------------------------------------------------
# Hand-made masks


def test_ring_is_polygon_with_hole(tmp_path):
    labels = np.zeros((8, 8), np.uint8)
    labels[1:7, 1:7] = 1
    labels[3:5, 3:5] = 0
    collection, _ = export(tmp_path, labels, mpp=1.0)

    assert check_feature_collection(collection, image_width=8, image_height=8) == []
    [feature] = collection["features"]
    assert feature["geometry"]["type"] == "Polygon"
    assert len(feature["geometry"]["coordinates"]) == 2
    assert shape(feature["geometry"]).area == 32
    assert feature["properties"]["measurements"]["Area um^2"] == 32


def test_corner_touching_squares_stay_separate(tmp_path):
    labels = np.zeros((6, 6), np.uint8)
    labels[1:3, 1:3] = 2
    labels[3:5, 3:5] = 2
    # Bands of 3 rows put the touching corner exactly on a band border.
    for band_rows in (1, 3, 100):
        collection, _ = export(tmp_path, labels, band_rows=band_rows)
        assert len(collection["features"]) == 2, f"band_rows={band_rows}"
        assert {shape(f["geometry"]).area for f in collection["features"]} == {4.0}


@pytest.mark.parametrize("band_rows", [1, 2, 5, 100])
def test_u_shape_across_bands_is_one_feature(tmp_path, band_rows):
    # The two arms are separate pieces in the upper bands and join only in the bottom rows.
    labels = np.zeros((12, 9), np.uint8)
    labels[1:11, 1:3] = 3
    labels[1:11, 6:8] = 3
    labels[9:11, 1:8] = 3
    collection, _ = export(tmp_path, labels, band_rows=band_rows)

    [feature] = collection["features"]
    assert feature["geometry"]["type"] == "Polygon"
    assert shape(feature["geometry"]).area == np.count_nonzero(labels)
    assert check_feature_collection(collection) == []


@pytest.mark.parametrize("band_rows", [1, 2, 5, 100])
def test_closed_loop_across_bands_keeps_hole(tmp_path, band_rows):
    labels = np.zeros((12, 12), np.uint8)
    labels[1:11, 1:11] = 1
    labels[4:8, 4:8] = 2
    collection, _ = export(tmp_path, labels, band_rows=band_rows)

    tumor = [f for f in collection["features"] if f["properties"]["classification"]["name"] == "Tumor"]
    assert len(tumor) == 1
    assert len(tumor[0]["geometry"]["coordinates"]) == 2  # shell and one hole
    assert shape(tumor[0]["geometry"]).area == 100 - 16


def test_single_pixel_region(tmp_path):
    labels = np.zeros((3, 3), np.uint8)
    labels[1, 1] = 4
    collection, _ = export(tmp_path, labels, l0_per_px=2.5, mpp=0.5)

    [feature] = collection["features"]
    [ring] = feature["geometry"]["coordinates"]
    assert len(ring) == 5
    assert sorted(map(tuple, ring[:4])) == [(2.5, 2.5), (2.5, 5.0), (5.0, 2.5), (5.0, 5.0)]
    assert feature["properties"]["measurements"]["Area um^2"] == 0.25
    assert feature["properties"]["classification"] == {"name": "Necrosis", "color": [50, 50, 50]}


@pytest.mark.parametrize("band_rows", [1, 3, 7, 64])
def test_band_rows_give_identical_geometry(tmp_path, band_rows):
    labels = blob_labels(seed=band_rows)
    whole, _ = export(tmp_path, labels, name="whole.geojson", l0_per_px=2.004, band_rows=10**6)
    banded, _ = export(tmp_path, labels, name="banded.geojson", l0_per_px=2.004, band_rows=band_rows)
    assert len(whole["features"]) == region_count(labels)
    assert geometry_set(banded) == geometry_set(whole)


@settings(max_examples=60, deadline=None)
@given(
    labels=arrays(np.uint8, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=14), elements=st.integers(0, len(CLASSES))),
    band_rows=st.integers(1, 5),
)
def test_random_maps_round_trip(tmp_path_factory, labels, band_rows):
    path = tmp_path_factory.mktemp("random")
    banded, counts = export(path, labels, name="banded.geojson", l0_per_px=2.004, band_rows=band_rows)
    whole, _ = export(path, labels, name="whole.geojson", l0_per_px=2.004, band_rows=10**6)
    rows, cols = labels.shape

    assert check_feature_collection(banded, image_width=round(cols * 2.004, 2), image_height=round(rows * 2.004, 2)) == []
    assert counts["feature_count"] == region_count(labels)
    assert np.array_equal(rasterize(banded, labels.shape, 2.004), labels)
    assert geometry_set(banded) == geometry_set(whole)


def test_reads_one_band_at_a_time(tmp_path):
    labels = blob_labels(seed=5)
    probabilities = np.random.default_rng(5).random((len(CLASSES), *labels.shape), dtype=np.float32)
    recorded_labels, recorded_probabilities = RecordingArray(labels), RecordingArray(probabilities)
    banded, _ = export(tmp_path, recorded_labels, name="banded.geojson", probabilities=recorded_probabilities, band_rows=16)
    whole, _ = export(tmp_path, labels, name="whole.geojson", probabilities=probabilities)

    assert max(rows for rows, _ in recorded_labels.read_shapes) == 16
    assert sum(rows for rows, _ in recorded_labels.read_shapes) == labels.shape[0]
    assert max(rows for rows, _ in recorded_probabilities.read_shapes) == 16
    assert geometry_set(banded) == geometry_set(whole)


def test_gzip_round_trip(tmp_path):
    labels = blob_labels(seed=3)
    plain, _ = export(tmp_path, labels, name="regions.geojson")
    compressed, _ = export(tmp_path, labels, name="regions.geojson.gz")

    with gzip.open(tmp_path / "regions.geojson.gz", "rt", encoding="utf-8") as stream:
        assert json.load(stream)["type"] == "FeatureCollection"
    assert geometry_set(compressed) == geometry_set(plain)
    assert (tmp_path / "regions.geojson.gz").stat().st_size < (tmp_path / "regions.geojson").stat().st_size


@pytest.mark.parametrize("m_shape", [(0, 0), (4, 0), (5, 7)], ids=["no-pixels", "no-columns", "all-background"])
def test_empty_map_gives_empty_collection(tmp_path, m_shape):
    collection, counts = export(tmp_path, np.zeros(m_shape, np.uint8))
    assert collection == {"type": "FeatureCollection", "features": []}
    assert counts["feature_count"] == 0
    assert check_feature_collection(collection) == []


def test_detection_object_type(tmp_path):
    collection, counts = export(tmp_path, blob_labels(seed=4), object_type="detection")
    assert collection["features"]
    assert {f["properties"]["objectType"] for f in collection["features"]} == {"detection"}
    assert counts["object_type"] == "detection"


def test_min_area_drops_small_regions(tmp_path):
    labels = np.zeros((20, 20), np.uint8)
    labels[0, 0] = 1  # 1 px = 0.25 um^2
    labels[5:15, 5:15] = 2  # 100 px = 25 um^2
    labels[18:20, 18:20] = 5  # 4 px = 1 um^2
    collection, counts = export(tmp_path, labels, mpp=0.5, min_area_um2=1.0)

    names = sorted(f["properties"]["classification"]["name"] for f in collection["features"])
    assert names == ["Other", "Stroma"]
    assert counts["dropped_below_min_area"] == 1


def test_mean_probability_per_region(tmp_path):
    labels = np.zeros((10, 10), np.uint8)
    labels[0:6, 0:4] = 1  # crosses the band border at row 4
    labels[7:10, 6:10] = 1
    labels[0:3, 6:10] = 2
    probabilities = np.zeros((len(CLASSES), 10, 10), np.float16)
    probabilities[0, 0:6, 0:4] = 0.5
    probabilities[0, 0:2, 0:4] = 1.0  # region mean: (8 * 1.0 + 16 * 0.5) / 24
    probabilities[0, 7:10, 6:10] = 0.25
    probabilities[1, 0:3, 6:10] = 0.75
    probabilities[1, 0:6, 0:4] = 0.9  # another class's channel: must not count
    collection, _ = export(tmp_path, labels, probabilities=probabilities, band_rows=4)

    means = {
        (f["properties"]["classification"]["name"], shape(f["geometry"]).area): f["properties"]["measurements"]["Mean probability"]
        for f in collection["features"]
    }
    assert means == {("Tumor", 24.0): pytest.approx(16 / 24), ("Tumor", 12.0): 0.25, ("Stroma", 12.0): 0.75}


def test_mean_probability_nan_written_as_string(tmp_path):
    labels = np.ones((2, 2), np.uint8)
    probabilities = np.full((len(CLASSES), 2, 2), np.nan, np.float32)
    collection, _ = export(tmp_path, labels, probabilities=probabilities)
    [feature] = collection["features"]
    assert feature["properties"]["measurements"]["Mean probability"] == "NaN"
    assert check_feature_collection(collection) == []


def test_clip_to_image_size(tmp_path):
    # A label map whose last column reaches past a level-0 width of 9.5.
    labels = np.ones((4, 5), np.uint8)
    collection, _ = export(tmp_path, labels, l0_per_px=2.0, l0_image_size=(9.5, 8))
    assert check_feature_collection(collection, image_width=9.5, image_height=8) == []
    assert shape(collection["features"][0]["geometry"]).bounds == (0.0, 0.0, 9.5, 8.0)


def test_origin_shifts_and_clips(tmp_path):
    # Class 1 covers level-0 x 4..10, y 6..12 (2 level-0 pixels per label pixel). Measured from
    # level-0 (3, 5) and clipped to a 6 x 18 image there, it becomes x 1..6, y 1..7.
    labels = np.zeros((7, 6), np.uint8)
    labels[3:6, 2:5] = 1
    labels[0, 5] = 2
    collection, counts = export(tmp_path, labels, l0_per_px=2.0, l0_image_size=(6, 18), l0_origin=(3, 5))

    assert check_feature_collection(collection, image_width=6, image_height=18) == []
    by_class = {feature["properties"]["classification"]["name"]: shape(feature["geometry"]) for feature in collection["features"]}
    assert by_class[CLASSES[0].qupath_name].bounds == (1.0, 1.0, 6.0, 7.0)
    # The class-2 pixel covers level-0 x 10..12, which lies past the image's right edge at x 9.
    assert CLASSES[1].qupath_name not in by_class
    assert counts["dropped_empty_geometry"] == 1


def test_origin_zero_matches_default(tmp_path):
    labels = np.zeros((6, 6), np.uint8)
    labels[1:4, 2:5] = 3
    default, _ = export(tmp_path, labels, name="default.geojson", l0_per_px=2.0)
    shifted, _ = export(tmp_path, labels, name="zero.geojson", l0_per_px=2.0, l0_origin=(0, 0))

    assert [feature["geometry"] for feature in shifted["features"]] == [feature["geometry"] for feature in default["features"]]


def test_invalid_label_value_leaves_no_file(tmp_path):
    labels = np.ones((10, 10), np.uint8)
    labels[8, 3] = 7
    with pytest.raises(ValueError, match=r"labels must be 0\.\.5, found \[7\] in rows 8\.\.9"):
        write_geojson(tmp_path / "regions.geojson", labels, 1.0, 0.5, band_rows=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"probabilities": np.zeros((5, 3, 3))}, "probabilities must have shape", id="probability-shape"),
        pytest.param({"object_type": "cell"}, "object_type must be one of", id="object-type"),
        pytest.param({"l0_per_px": 0.0}, "l0_per_px must be a positive number", id="l0-per-px"),
        pytest.param({"simplify_um": -1.0}, "simplify_um must be 0 or more", id="simplify"),
        pytest.param({"band_rows": 0}, "band_rows must be 1 or more", id="band-rows"),
        pytest.param({"l0_origin": (1.5, 0)}, "l0_origin must be two whole numbers", id="fractional-origin"),
        pytest.param({"l0_origin": (1, 2, 3)}, "l0_origin must be two whole numbers", id="origin-length"),
    ],
)
def test_invalid_arguments_raise(tmp_path, options, message):
    arguments = {"l0_per_px": 1.0, "mpp": 0.5, **options}
    with pytest.raises(ValueError, match=message):
        write_geojson(tmp_path / "regions.geojson", np.ones((4, 4), np.uint8), **arguments)
