"""Resolution (microns per pixel) of a slide: reading it from metadata and deciding which to use.

Rules, the same for every backend:

- An ``mpp`` given by the caller (the ``--mpp`` option) wins over metadata; its source is
  recorded as ``"--mpp"``.
- Without it, the metadata must give a resolution, or opening fails and the message names the
  ``--mpp MICRONS`` option. A resolution is never guessed.
- The x and y resolution must agree within 1 %, because every later stage assumes square pixels.
- A value outside 0.05 to 100 microns per pixel is not a microscope scan and is rejected.
- A slide more than ``MAX_UPSAMPLE`` times coarser than the model's resolution is rejected, or
  run with a warning when the caller allows upsampling (the ``--allow-upsample`` option).
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import NamedTuple

from bcseg.errors import BadInputError

log = logging.getLogger(__name__)

MIN_PLAUSIBLE_MPP = 0.05
MAX_PLAUSIBLE_MPP = 100.0
# Largest relative difference between x and y resolution accepted as square pixels.
MAX_XY_MISMATCH = 0.01
# Largest ratio of slide mpp to model mpp run without --allow-upsample: a 10x scan at 1 micron per
# pixel still runs with a 0.5 model, a 5x scan at 2 microns per pixel does not.
MAX_UPSAMPLE = 2.0

# TIFF ResolutionUnit values: 1 none, 2 inch, 3 centimeter.
MICRONS_PER_TIFF_UNIT = {2: 25_400.0, 3: 10_000.0}

# OME PhysicalSizeX/YUnit values (UNITS_LENGTH in the OME schema) that occur for microscopes.
MICRONS_PER_OME_UNIT = {
    "m": 1e6,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,  # MICRO SIGN
    "μm": 1.0,  # GREEK SMALL LETTER MU
    "um": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
    "in": 25_400.0,
}

APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


class MetadataResolution(NamedTuple):
    """Resolution found in a slide's metadata, in microns per pixel, and the field it came from."""

    mpp_x: float
    mpp_y: float
    source: str


def mpp_from_tiff_resolution(
    x_resolution: float | None, y_resolution: float | None, unit: int | None
) -> MetadataResolution | None:
    """Convert TIFF XResolution/YResolution (pixels per unit) to microns per pixel.

    Returns None when the resolution is unknown: a tag is missing, the unit is "none" or unknown,
    or a value is at most 1 pixel per unit, which writers use as a placeholder.
    """
    if x_resolution is None or y_resolution is None or unit not in MICRONS_PER_TIFF_UNIT:
        return None
    if x_resolution <= 1.0 or y_resolution <= 1.0:
        return None
    microns = MICRONS_PER_TIFF_UNIT[unit]
    return MetadataResolution(microns / x_resolution, microns / y_resolution, "tiff.XResolution")


def mpp_from_ome_xml(ome_xml: str) -> MetadataResolution | None:
    """Read PhysicalSizeX/Y of the first image in OME-XML, converted to microns per pixel.

    The OME schema's default unit is the micrometre. Returns None when either size is missing.
    Raises BadInputError for a length unit missing from ``MICRONS_PER_OME_UNIT``.
    """
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        log.warning("OME-XML metadata could not be parsed; ignoring its resolution")
        return None
    pixels = next((element for element in root.iter() if element.tag.endswith("}Pixels") or element.tag == "Pixels"), None)
    if pixels is None:
        return None

    sizes = []
    for axis in ("X", "Y"):
        size = pixels.get(f"PhysicalSize{axis}")
        if size is None:
            return None
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in MICRONS_PER_OME_UNIT:
            raise BadInputError(
                f"OME metadata gives PhysicalSize{axis} in unit {unit!r}, which is not a supported "
                f"length unit ({', '.join(MICRONS_PER_OME_UNIT)}); pass the resolution with --mpp MICRONS"
            )
        sizes.append(float(size) * MICRONS_PER_OME_UNIT[unit])
    return MetadataResolution(sizes[0], sizes[1], "ome.PhysicalSizeX")


def mpp_from_aperio_description(description: str) -> MetadataResolution | None:
    """Read the ``MPP = `` field of an Aperio SVS ImageDescription, or return None."""
    match = APERIO_MPP.search(description)
    if match is None:
        return None
    try:
        mpp = float(match.group(1))
    except ValueError:
        return None
    return MetadataResolution(mpp, mpp, "aperio.MPP")


def resolve_mpp(path: Path, mpp: float | None, found: MetadataResolution | None) -> tuple[float, str]:
    """Decide the slide's microns per level-0 pixel and its source, following the module rules.

    ``mpp`` is the caller's value (the ``--mpp`` option) or None, ``found`` what the metadata
    gives or None. Raises BadInputError naming ``path`` when no usable resolution exists.
    """
    if mpp is not None:
        mpp = float(mpp)
        check_plausible_mpp(path, mpp, "--mpp")
        if found is not None:
            log.info(
                "%s: using --mpp %g instead of %g x %g from %s", path, mpp, found.mpp_x, found.mpp_y, found.source
            )
        return mpp, "--mpp"

    if found is None:
        raise BadInputError(
            f"{path}: the slide has no resolution (microns per pixel) in its metadata; "
            "give it with --mpp MICRONS, for example --mpp 0.25 for a 40x scan or --mpp 0.5 for 20x"
        )
    mismatch = abs(found.mpp_x - found.mpp_y) / max(found.mpp_x, found.mpp_y)
    if mismatch > MAX_XY_MISMATCH:
        raise BadInputError(
            f"{path}: x and y resolution differ by {mismatch:.1%} ({found.mpp_x:g} and {found.mpp_y:g} "
            f"microns per pixel from {found.source}); only square pixels are supported, within "
            f"{MAX_XY_MISMATCH:.0%}. Resample the slide, or pass --mpp MICRONS if the metadata is wrong"
        )
    mpp = (found.mpp_x + found.mpp_y) / 2
    check_plausible_mpp(path, mpp, found.source)
    return mpp, found.source


def check_plausible_mpp(path: Path, mpp: float, source: str) -> None:
    """Raise BadInputError unless ``mpp`` lies in the range a microscope scan can have."""
    if not MIN_PLAUSIBLE_MPP <= mpp <= MAX_PLAUSIBLE_MPP:
        if source == "--mpp":
            fix = "Give a value in that range"
        else:
            fix = "The metadata is probably a placeholder, so give the real resolution with --mpp MICRONS"
        raise BadInputError(
            f"{path}: resolution {mpp:g} microns per pixel (from {source}) is outside the plausible "
            f"range {MIN_PLAUSIBLE_MPP:g} to {MAX_PLAUSIBLE_MPP:g}. {fix}"
        )


def check_model_resolution(path: Path, slide_mpp: float, mpp_source: str, model_mpp: float, allow_upsample: bool) -> None:
    """Reject a slide much coarser than the model's resolution, or warn when ``allow_upsample``.

    Up to MAX_UPSAMPLE times the model's microns per pixel is accepted silently.
    """
    factor = slide_mpp / model_mpp
    if factor <= MAX_UPSAMPLE:
        return
    if not allow_upsample:
        if mpp_source == "--mpp":
            check = "check the --mpp value"
        else:
            check = "correct the resolution with --mpp MICRONS if the metadata is wrong"
        raise BadInputError(
            f"{path}: resolution {slide_mpp:g} microns per pixel (from {mpp_source}) is {factor:.1f} times "
            f"coarser than the model's {model_mpp:g}, so the model would see the slide enlarged and blurred. "
            f"Use a scan at the model's resolution, {check}, or pass --allow-upsample to run anyway"
        )
    log.warning(
        "%s: resolution %g microns per pixel is %.1f times coarser than the model's %g; the slide is "
        "upsampled (--allow-upsample), so expect less accurate results",
        path, slide_mpp, factor, model_mpp,
    )
