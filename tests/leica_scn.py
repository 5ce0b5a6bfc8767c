"""A writer for small synthetic Leica SCN slides, whose scanned region sits at an offset.

The layout follows OpenSlide's description of the format: a BigTIFF whose first
ImageDescription is an ``<scn>`` XML document in the Leica namespace. The document contains a
collection of images, each placed by a ``view`` element with size and offset in nanometres. The
macro image covers the whole collection at offset (0, 0). The main image is a pyramid, one TIFF
directory per level. OpenSlide 4 makes level 0 the whole collection at the main image's
resolution and reports the main image's place as ``openslide.bounds-x/-y/-width/-height``.
Everything outside the main image reads as transparent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

LEICA_NAMESPACE = "http://www.leica-microsystems.com/scn/2010/10/01"
MACRO_DOWNSAMPLE = 10  # level-0 pixels per macro image pixel


def write_leica_scn(
    path: Path,
    main_pixels: np.ndarray,
    l0_main_xy: tuple[int, int],
    l0_slide_size: tuple[int, int],
    mpp: float = 0.5,
) -> Path:
    """Write a Leica SCN slide with one brightfield main image and a grey macro image.

    ``main_pixels`` (rows, cols, 3) is the main image at level 0, placed with its top-left corner
    at level-0 ``l0_main_xy = (x, y)`` in a slide of ``l0_slide_size = (width, height)`` level-0
    pixels of ``mpp`` microns. The main image is stored as two levels, downsample 1 and 2, in
    JPEG tiles of 256 pixels.
    """
    nm_per_px = round(mpp * 1000)
    main_height, main_width = main_pixels.shape[:2]
    l0_width, l0_height = l0_slide_size
    macro = np.full((l0_height // MACRO_DOWNSAMPLE, l0_width // MACRO_DOWNSAMPLE, 3), 200, dtype=np.uint8)
    half = np.ascontiguousarray(main_pixels[::2, ::2])
    px_per_cm = 10_000 / mpp

    collection_size = f'sizeX="{l0_width * nm_per_px}" sizeY="{l0_height * nm_per_px}"'
    macro_xml = _image_xml(
        "macro", [(0, macro.shape[1], macro.shape[0])], f'{collection_size} offsetX="0" offsetY="0"', objective="0.16"
    )
    main_view = (
        f'sizeX="{main_width * nm_per_px}" sizeY="{main_height * nm_per_px}" '
        f'offsetX="{l0_main_xy[0] * nm_per_px}" offsetY="{l0_main_xy[1] * nm_per_px}"'
    )
    main_xml = _image_xml("main", [(1, main_width, main_height), (2, half.shape[1], half.shape[0])], main_view, objective="20")
    description = (
        f'<?xml version="1.0" encoding="utf-8"?>\n<scn xmlns="{LEICA_NAMESPACE}">\n'
        f'<collection name="synthetic" {collection_size}>\n{macro_xml}{main_xml}</collection>\n</scn>\n'
    )

    # TIFF directory 0 is the macro image and carries the XML; 1 and 2 are the main image's levels.
    options = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg", "metadata": None}
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(macro, description=description, **options)
        writer.write(main_pixels, resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER", **options)
        writer.write(half, resolution=(px_per_cm / 2, px_per_cm / 2), resolutionunit="CENTIMETER", **options)
    return path


def _image_xml(name: str, dimensions: list[tuple[int, int, int]], view: str, objective: str) -> str:
    """One ``<image>`` element; ``dimensions`` lists (TIFF directory, width, height) per level."""
    dimension_xml = "".join(
        f'<dimension sizeX="{width}" sizeY="{height}" r="{r}" ifd="{ifd}"/>\n'
        for r, (ifd, width, height) in enumerate(dimensions)
    )
    first_width, first_height = dimensions[0][1:]
    return (
        f'<image name="{name}">\n<device model="synthetic" version="1"/>\n'
        f'<pixels sizeX="{first_width}" sizeY="{first_height}">\n{dimension_xml}</pixels>\n'
        f"<view {view}/>\n"
        f"<scanSettings><objectiveSettings><objective>{objective}</objective></objectiveSettings>"
        "<illuminationSettings><illuminationSource>brightfield</illuminationSource>"
        "</illuminationSettings></scanSettings>\n</image>\n"
    )
