"""A checker of the GeoJSON rules QuPath (0.4 to 0.7) and RFC 7946 put on exported features.

QuPath cannot run in the test environment, so exports are held to these rules instead:

- the top level is a FeatureCollection;
- each Feature has a UUID ``id`` and ``objectType`` inside ``properties``;
- its classification has a name and an int RGB(A) colour (QuPath fails to import a name without one);
- geometry is a Polygon or MultiPolygon, valid per shapely, with closed rings of at least 4
  positions, shells counter-clockwise and holes clockwise (positive and negative signed area);
- coordinates have at most 2 decimals and lie inside the image when its size is given;
- measurements are finite numbers or QuPath's strings for NaN and infinities.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import shape

QUPATH_OBJECT_TYPES = ("annotation", "detection", "cell", "tile", "tmaCore")
NON_FINITE_STRINGS = ("NaN", "Infinity", "-Infinity")
UUID_PATTERN = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
MAX_DECIMALS = 2
# Endings of the ring messages after which a geometry cannot be checked further.
RING_STRUCTURE_PROBLEMS = (
    "not a list of [x, y] number pairs",
    "fewer than 4",
    "is not closed (first position differs from the last)",
)


def load_feature_collection(path: str | Path) -> Any:
    """Read a ``.geojson`` or ``.geojson.gz`` file."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as stream:
        return json.load(stream)


def check_feature_collection(obj: Any, image_width: float | None = None, image_height: float | None = None) -> list[str]:
    """Return one message per rule that ``obj`` breaks, so an empty list means it passes."""
    if not isinstance(obj, dict) or obj.get("type") != "FeatureCollection":
        return ["top level is not a FeatureCollection object"]
    features = obj.get("features")
    if not isinstance(features, list):
        return ["FeatureCollection has no 'features' list"]

    problems = []
    for index, feature in enumerate(features):
        problems += [f"feature {index}: {problem}" for problem in check_feature(feature, image_width, image_height)]
    return problems


def check_feature(feature: Any, image_width: float | None = None, image_height: float | None = None) -> list[str]:
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        return ["not a Feature object"]
    problems = []

    feature_id = feature.get("id")
    if not (isinstance(feature_id, str) and UUID_PATTERN.match(feature_id)):
        problems.append(f"id {feature_id!r} is not a UUID string")

    properties = feature.get("properties")
    if not isinstance(properties, dict):
        return problems + ["properties missing or not an object"]
    problems += _check_properties(properties)
    if "objectType" in feature:
        problems.append("objectType sits outside properties, where QuPath does not read it")

    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        return problems + ["geometry missing or not an object"]
    problems += check_geometry(geometry, image_width, image_height)
    return problems


def _check_properties(properties: dict) -> list[str]:
    problems = []
    object_type = properties.get("objectType")
    if object_type not in QUPATH_OBJECT_TYPES:
        problems.append(f"properties.objectType {object_type!r} is not one of {', '.join(QUPATH_OBJECT_TYPES)}")

    classification = properties.get("classification")
    if not isinstance(classification, dict):
        problems.append("properties.classification missing or not an object")
    else:
        name = classification.get("name")
        if not (isinstance(name, str) and name):
            problems.append(f"classification name {name!r} is not a non-empty string")
        color = classification.get("color")
        if not _is_color(color):
            problems.append(f"classification color {color!r} is not 3 or 4 ints in 0..255")

    measurements = properties.get("measurements", {})
    if not isinstance(measurements, dict):
        problems.append("properties.measurements is not an object")
    else:
        for key, value in measurements.items():
            if not _is_measurement(value):
                problems.append(f"measurement {key!r} = {value!r} is not a finite number or one of {NON_FINITE_STRINGS}")
    return problems


def _is_color(color: Any) -> bool:
    if not isinstance(color, list) or len(color) not in (3, 4):
        return False
    return all(isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255 for value in color)


def _is_measurement(value: Any) -> bool:
    if isinstance(value, str):
        return value in NON_FINITE_STRINGS
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_geometry(geometry: dict, image_width: float | None = None, image_height: float | None = None) -> list[str]:
    """Check a GeoJSON Polygon or MultiPolygon. Any other geometry type is a problem."""
    geometry_type = geometry.get("type")
    coordinates = geometry.get("coordinates")
    if geometry_type == "Polygon":
        polygons = [coordinates]
    elif geometry_type == "MultiPolygon":
        polygons = coordinates if isinstance(coordinates, list) else [None]
    else:
        return [f"geometry type {geometry_type!r} is not Polygon or MultiPolygon"]

    problems = []
    for polygon_index, rings in enumerate(polygons):
        if not isinstance(rings, list) or not rings:
            problems.append(f"polygon {polygon_index} has no rings")
            continue
        for ring_index, ring in enumerate(rings):
            where = f"polygon {polygon_index} ring {ring_index}"
            problems += [f"{where}: {problem}" for problem in _check_ring(ring, is_shell=ring_index == 0, image_width=image_width, image_height=image_height)]

    # Validity is checked only on rings that shapely builds as written: it rejects rings of fewer
    # than 4 positions and silently closes open ones.
    if any(problem.endswith(RING_STRUCTURE_PROBLEMS) for problem in problems):
        return problems
    shapely_geometry = shape(geometry)
    if not shapely_geometry.is_valid:
        problems.append(f"invalid geometry: {shapely.is_valid_reason(shapely_geometry)}")
    return problems


def _check_ring(ring: Any, is_shell: bool, image_width: float | None, image_height: float | None) -> list[str]:
    if not isinstance(ring, list) or not all(_is_position(position) for position in ring):
        return [RING_STRUCTURE_PROBLEMS[0]]
    problems = []
    if len(ring) < 4:
        problems.append(f"has {len(ring)} positions, {RING_STRUCTURE_PROBLEMS[1]}")
    if ring and ring[0] != ring[-1]:
        problems.append(RING_STRUCTURE_PROBLEMS[2])

    for x, y in ring:
        if round(x, MAX_DECIMALS) != x or round(y, MAX_DECIMALS) != y:
            problems.append(f"position ({x}, {y}) has more than {MAX_DECIMALS} decimals")
            break
    for x, y in ring:
        if (image_width is not None and not 0 <= x <= image_width) or (image_height is not None and not 0 <= y <= image_height):
            problems.append(f"position ({x}, {y}) is outside the image ({image_width} x {image_height})")
            break

    area = signed_area(ring)
    if is_shell and not area > 0:
        problems.append(f"shell is not counter-clockwise (signed area {area})")
    if not is_shell and not area < 0:
        problems.append(f"hole is not clockwise (signed area {area})")
    return problems


def _is_position(position: Any) -> bool:
    return (
        isinstance(position, list)
        and len(position) == 2
        and all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) for value in position)
    )


def signed_area(ring: list) -> float:
    """Compute the shoelace area of a closed ring, positive when counter-clockwise with y pointing up."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
