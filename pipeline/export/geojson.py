"""Label map to GeoJSON polygons that QuPath imports, written as a stream.

Coordinates are level-0 pixels ``(x, y)``: x to the right, y down, measured from a level-0
position that the caller gives (``l0_origin``). The default, (0, 0), is the top-left corner of
level 0 as the slide reader reports it. For a slide with a bounds offset (MRXS, Leica SCN),
``pipeline.run`` passes the bounds' corner by default, because QuPath shows such a slide from
there. Model pixel ``(row, col)`` covers level-0 ``[col * s, (col + 1) * s) x [row * s,
(row + 1) * s)`` with ``s = l0_per_px``, before the origin is subtracted. Polygons follow pixel
edges, so they scale without a half-pixel shift.

The label map is read in row bands. A region cut by a band border is joined by pixel adjacency
(same class, vertically neighbouring pixels) and its pieces are unioned, so the output does not
depend on the band height. Regions that touch only at a corner stay separate (4-connectivity).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import rasterio.features
import shapely
from affine import Affine
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient

from bcseg.classes import CLASSES, NUM_CLASSES
from pipeline.export import atomic_output

logger = logging.getLogger(__name__)

OBJECT_TYPES = ("annotation", "detection")
COORDINATE_DECIMALS = 2  # QuPath writes 2 decimals and snaps what it reads to a 0.01 px grid
GZIP_LEVEL = 6  # level 9 took 9 times as long for 3 % smaller output, on an 8.6 MB export of a BCSS mask
PROBABILITY_SLAB_ROWS = 256  # rows of a probability channel converted to float64 at a time


@dataclass(eq=False)
class _Region:
    """One 4-connected region of one class, whose pieces from several bands join through ``parent``."""

    label: int
    pixel_count: int
    probability_sum: float
    parts: list[Polygon] = field(default_factory=list)  # model pixels, one per band crossed
    parent: _Region | None = None


def write_geojson(
    path: str | os.PathLike,
    labels,
    l0_per_px: float,
    mpp: float,
    probabilities=None,
    object_type: str = "annotation",
    simplify_um: float = 0.0,
    min_area_um2: float = 0.0,
    band_rows: int = 1024,
    l0_image_size: tuple[int, int] | None = None,
    l0_origin: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """Write one Feature per connected region per class as a GeoJSON FeatureCollection.

    Each feature carries the measurement "Area um^2": the region's pixel count times ``mpp**2``,
    the label-map area, which simplification and clipping do not change.

    Args:
        path: output file. A name ending in ``.gz`` is gzip-compressed (``.geojson.gz``).
        labels: 2-D label map at model resolution, (rows, cols), 0 background and 1..5 the classes
            of ``bcseg.classes.CLASSES``. Any array-like that supports ``labels[r0:r1, :]``.
        l0_per_px: level-0 pixels per model pixel.
        mpp: microns per model pixel.
        probabilities: optional (5, rows, cols) array-like whose channel ``k - 1`` is class ``k``.
            When given, each feature gets the measurement "Mean probability" of its class.
        object_type: QuPath object type, one of ``OBJECT_TYPES``.
        simplify_um: Douglas-Peucker tolerance in microns. 0 keeps the exact pixel outlines.
            Each region is simplified on its own, so neighbours may overlap or gap by up to it.
        min_area_um2: regions smaller than this are left out. The holes they leave in a
            surrounding region stay holes.
        band_rows: label-map rows read at a time. Peak memory is about 20 bytes per pixel of a
            band (354 MiB measured for 1024 rows of 18,000 columns).
        l0_image_size: optional level-0 (width, height) of the image, measured from ``l0_origin``.
            Polygons are clipped to it, for label maps whose last row or column reaches past the
            slide.
        l0_origin: level-0 ``(x, y)`` subtracted from every coordinate, so that it becomes (0, 0)
            of the output. Whole pixels, so the shift adds no rounding.

    Returns:
        Counts: features written per class, their area in um^2 per class, and regions left out.
    """
    _check_arguments(labels, l0_per_px, mpp, probabilities, object_type, simplify_um, min_area_um2, band_rows)
    if len(l0_origin) != 2 or any(int(value) != value for value in l0_origin):
        raise ValueError(f"l0_origin must be two whole numbers (x, y), got {l0_origin!r}")
    l0_origin_xy = np.array(l0_origin, dtype=np.float64)
    simplify_l0 = simplify_um / mpp * l0_per_px
    l0_clip_box = shapely.box(0, 0, *l0_image_size) if l0_image_size is not None else None
    features_per_class = {tissue_class.name: 0 for tissue_class in CLASSES}
    area_um2_per_class = {tissue_class.name: 0.0 for tissue_class in CLASSES}
    dropped_small = dropped_empty = 0

    with atomic_output(path) as temporary, _open_text(temporary, str(path).endswith(".gz")) as stream:
        stream.write('{"type":"FeatureCollection","features":[')
        separator = "\n"
        for region in _trace_regions(labels, probabilities, band_rows):
            area_um2 = region.pixel_count * mpp * mpp
            if area_um2 < min_area_um2:
                dropped_small += 1
                continue
            geometry = _finish_geometry(region, l0_per_px, l0_origin_xy, simplify_l0, l0_clip_box)
            if geometry is None:
                dropped_empty += 1
                continue

            feature = _feature(region, geometry, area_um2, object_type, with_probability=probabilities is not None)
            stream.write(separator + json.dumps(feature, separators=(",", ":"), allow_nan=False))
            separator = ",\n"
            name = CLASSES[region.label - 1].name
            features_per_class[name] += 1
            area_um2_per_class[name] += area_um2
        stream.write("\n]}\n")

    feature_count = sum(features_per_class.values())
    logger.info("wrote %d features to %s (%d below %g um^2 left out)", feature_count, path, dropped_small, min_area_um2)
    if dropped_empty:
        logger.warning("left out %d regions of %s with no area after clipping and rounding to 0.01 px", dropped_empty, path)
    return {
        "path": str(path),
        "object_type": object_type,
        "feature_count": feature_count,
        "features_per_class": features_per_class,
        "area_um2_per_class": area_um2_per_class,
        "dropped_below_min_area": dropped_small,
        "dropped_empty_geometry": dropped_empty,
    }


def _check_arguments(labels, l0_per_px, mpp, probabilities, object_type, simplify_um, min_area_um2, band_rows) -> None:
    if len(labels.shape) != 2:
        raise ValueError(f"labels must be 2-D (rows, cols), got shape {tuple(labels.shape)}")
    m_rows, m_cols = (int(n) for n in labels.shape)
    if probabilities is not None and tuple(probabilities.shape) != (NUM_CLASSES, m_rows, m_cols):
        raise ValueError(
            f"probabilities must have shape {(NUM_CLASSES, m_rows, m_cols)} to match labels, "
            f"got {tuple(probabilities.shape)}"
        )
    for name, value in (("l0_per_px", l0_per_px), ("mpp", mpp)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    for name, value in (("simplify_um", simplify_um), ("min_area_um2", min_area_um2)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be 0 or more, got {value!r}")
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {', '.join(OBJECT_TYPES)}, got {object_type!r}")
    if band_rows < 1:
        raise ValueError(f"band_rows must be 1 or more, got {band_rows!r}")


def _open_text(path, compressed: bool):
    if compressed:
        return gzip.open(path, "wt", encoding="utf-8", compresslevel=GZIP_LEVEL)
    return open(path, "w", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Tracing regions band by band


def _trace_regions(labels, probabilities, band_rows: int) -> Iterator[_Region]:
    """Yield every complete region of the label map once, as the root of its joined pieces."""
    m_rows, m_cols = (int(n) for n in labels.shape)
    if m_cols == 0:
        return
    open_roots: list[_Region] = []
    upper_ids: np.ndarray | None = None  # component ids of the previous band's bottom row
    upper_regions: dict[int, _Region] = {}

    for m_row0 in range(0, m_rows, band_rows):
        m_row1 = min(m_row0 + band_rows, m_rows)
        band = _read_band(labels, m_row0, m_row1)
        component_ids, regions = _band_regions(band, m_row0, probabilities)

        # Join pieces cut by the border with the band above.
        if upper_ids is not None:
            _join_across_border(upper_ids, upper_regions, component_ids[0], regions)

        # A region whose piece reaches this band's bottom row may continue below. The rest are complete.
        still_open: dict[int, _Region] = {}
        upper_regions = {}
        if m_row1 < m_rows:
            for component_id in np.unique(component_ids[-1]):
                if component_id:
                    upper_regions[int(component_id)] = regions[component_id]
                    root = _root(regions[component_id])
                    still_open[id(root)] = root
        candidates = {id(root): root for root in map(_root, [*open_roots, *regions[1:]])}
        for key, root in candidates.items():
            if key not in still_open:
                yield root
        open_roots = list(still_open.values())
        upper_ids = component_ids[-1].copy()


def _read_band(labels, m_row0: int, m_row1: int) -> np.ndarray:
    band = np.asarray(labels[m_row0:m_row1, :])
    if not np.issubdtype(band.dtype, np.integer):
        raise ValueError(f"labels must hold integers, got dtype {band.dtype}")
    if band.size and (band.min() < 0 or band.max() > NUM_CLASSES):
        found = np.unique(band[(band < 0) | (band > NUM_CLASSES)])[:10].tolist()
        raise ValueError(f"labels must be 0..{NUM_CLASSES}, found {found} in rows {m_row0}..{m_row1 - 1}")
    return band.astype(np.uint8, copy=False)


def _band_regions(band: np.ndarray, m_row0: int, probabilities) -> tuple[np.ndarray, list[_Region | None]]:
    """Number the regions of one band and trace their outlines. Index 0 of the region list is unused."""
    component_ids, component_labels = _label_components(band)
    count = len(component_labels)
    pixel_counts = np.bincount(component_ids.ravel(), minlength=count)
    if probabilities is None:
        probability_sums = np.zeros(count)
    else:
        present_labels = sorted(set(component_labels[1:]))
        probability_sums = _probability_sums(probabilities, band, m_row0, component_ids, count, present_labels)

    regions: list[_Region | None] = [None]
    for component_id in range(1, count):
        regions.append(_Region(component_labels[component_id], int(pixel_counts[component_id]), float(probability_sums[component_id])))
    if count == 1:
        return component_ids, regions

    # Outlines follow pixel edges, with x the column and y the row of the label map.
    outlines = rasterio.features.shapes(component_ids, mask=component_ids > 0, connectivity=4, transform=Affine.translation(0, m_row0))
    for geometry, component_id in outlines:
        shell, *holes = (np.asarray(ring) for ring in geometry["coordinates"])
        regions[int(component_id)].parts.append(Polygon(shell, holes))
    return component_ids, regions


def _label_components(band: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Give every 4-connected region of every class its own id (0 stays background).

    Returns the id image (int32) and the class label of each id.
    """
    component_ids = np.zeros(band.shape, np.int32)
    component_labels = [0]
    present = np.flatnonzero(np.bincount(band.ravel(), minlength=NUM_CLASSES + 1))
    for label in present[present > 0]:
        count, ids = cv2.connectedComponents((band == label).view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
        in_class = ids > 0
        component_ids[in_class] = ids[in_class] + (len(component_labels) - 1)
        component_labels.extend([int(label)] * (count - 1))
    return component_ids, component_labels


def _probability_sums(probabilities, band: np.ndarray, m_row0: int, component_ids: np.ndarray, count: int, present_labels: list[int]) -> np.ndarray:
    """Sum, per region, the probability of the region's own class over its pixels."""
    sums = np.zeros(count)
    m_row1 = m_row0 + band.shape[0]
    for label in present_labels:
        channel = np.asarray(probabilities[label - 1, m_row0:m_row1, :])
        for row0 in range(0, band.shape[0], PROBABILITY_SLAB_ROWS):
            rows = slice(row0, row0 + PROBABILITY_SLAB_ROWS)
            in_class = band[rows] == label
            weights = channel[rows][in_class].astype(np.float64)
            sums += np.bincount(component_ids[rows][in_class], weights=weights, minlength=count)
    return sums


def _join_across_border(upper_ids: np.ndarray, upper_regions: dict[int, _Region], lower_ids: np.ndarray, lower_regions: list) -> None:
    """Merge regions whose pixels are vertical neighbours across a band border and share a class."""
    touching = (upper_ids > 0) & (lower_ids > 0)
    pairs = np.unique(np.stack([upper_ids[touching], lower_ids[touching]]), axis=1)
    for upper_id, lower_id in pairs.T:
        upper, lower = upper_regions[int(upper_id)], lower_regions[int(lower_id)]
        if upper.label == lower.label:
            _merge(upper, lower)


def _root(region: _Region) -> _Region:
    while region.parent is not None:
        if region.parent.parent is not None:
            region.parent = region.parent.parent
        region = region.parent
    return region


def _merge(first: _Region, second: _Region) -> None:
    first, second = _root(first), _root(second)
    if first is second:
        return
    if len(first.parts) > len(second.parts):
        first, second = second, first
    second.parts.extend(first.parts)
    second.pixel_count += first.pixel_count
    second.probability_sum += first.probability_sum
    first.parts = []
    first.parent = second


# ---------------------------------------------------------------------------------------------
# Geometry and features


def _finish_geometry(
    region: _Region, l0_per_px: float, l0_origin_xy: np.ndarray, simplify_l0: float, l0_clip_box
) -> Polygon | MultiPolygon | None:
    """Union a region's pieces and turn them into valid, oriented level-0 polygons on a 0.01 px grid,
    measured from ``l0_origin_xy``.

    Returns None when nothing polygonal is left (a sliver lost to clipping or rounding).
    """
    # shapely.coverage_union_all would be faster but rejects these pieces: a shared border edge has
    # vertices only where each piece turns, so the two sides are not noded alike.
    if len(region.parts) == 1:
        geometry = region.parts[0]
    else:
        # Tolerance 0 only drops the vertices that the union leaves in the middle of straight edges
        # on band borders (the traced pieces have none). On the integer pixel grid that is exact.
        geometry = shapely.simplify(shapely.union_all(region.parts), 0.0)
    # The only place where model pixels become output coordinates.
    geometry = shapely.transform(geometry, lambda xy: xy * l0_per_px - l0_origin_xy)
    if simplify_l0 > 0:
        geometry = shapely.simplify(geometry, simplify_l0, preserve_topology=True)
    if l0_clip_box is not None and not shapely.within(geometry, l0_clip_box):
        geometry = _polygonal(shapely.intersection(geometry, l0_clip_box))

    # Round before the validity check, so that it checks the coordinates that get written. Rounding
    # keeps exact pixel outlines valid. A simplified or clipped outline can break, and its repair
    # adds vertices at crossings, so the repaired outline is snapped to the grid once more.
    geometry = shapely.transform(geometry, lambda xy: np.round(xy, COORDINATE_DECIMALS))
    if not shapely.is_valid(geometry):
        repaired = _polygonal(shapely.make_valid(geometry))
        geometry = _polygonal(shapely.set_precision(repaired, 10.0**-COORDINATE_DECIMALS))
    if geometry.is_empty:
        return None
    return _oriented(geometry)


def _polygonal(geometry) -> Polygon | MultiPolygon:
    """Keep only the polygonal parts of a geometry (lines and points from repairs are dropped)."""
    if isinstance(geometry, (Polygon, MultiPolygon)):
        return geometry
    parts = [part for part in shapely.get_parts(geometry) if isinstance(part, (Polygon, MultiPolygon))]
    if not parts:
        return Polygon()
    return _polygonal(shapely.union_all(parts))


def _oriented(geometry: Polygon | MultiPolygon) -> Polygon | MultiPolygon:
    """Orient shells counter-clockwise and holes clockwise (positive and negative signed area), per RFC 7946."""
    if isinstance(geometry, Polygon):
        return orient(geometry, sign=1.0)
    return MultiPolygon([orient(polygon, sign=1.0) for polygon in geometry.geoms])


def _feature(region: _Region, geometry, area_um2: float, object_type: str, with_probability: bool) -> dict[str, Any]:
    tissue_class = CLASSES[region.label - 1]
    measurements = {"Area um^2": area_um2}
    if with_probability:
        measurements["Mean probability"] = _json_number(region.probability_sum / region.pixel_count)
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": _geometry_json(geometry),
        "properties": {
            "objectType": object_type,
            "classification": {"name": tissue_class.qupath_name, "color": list(tissue_class.color)},
            "measurements": measurements,
        },
    }


def _geometry_json(geometry: Polygon | MultiPolygon) -> dict[str, Any]:
    if isinstance(geometry, Polygon):
        return {"type": "Polygon", "coordinates": _rings_json(geometry)}
    return {"type": "MultiPolygon", "coordinates": [_rings_json(polygon) for polygon in geometry.geoms]}


def _rings_json(polygon: Polygon) -> list:
    rings = [polygon.exterior, *polygon.interiors]
    return [np.round(shapely.get_coordinates(ring), COORDINATE_DECIMALS).tolist() for ring in rings]


def _json_number(value: float) -> float | str:
    """Return ``value``, or QuPath's string for NaN and infinities, which JSON cannot hold."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value
