"""Slide reading: one interface over openslide, tifffile and plain RGB images.

``open_slide`` picks the backend from the file:

- ``.png``, ``.jpg``, ``.jpeg`` and other plain image suffixes: ``image`` (Pillow).
- A folder, or a single ``.dcm`` file: a DICOM slide, read with ``openslide``.
- A format OpenSlide recognizes: ``openslide``. Generic TIFF files that OpenSlide reads wrongly
  or not at all go to ``tifffile``. These are OME-TIFF (OpenSlide reads only level 0 of a SubIFD
  pyramid), stripped TIFF, non-RGB TIFF, and any TIFF that OpenSlide fails to open.
- Any other TIFF: ``tifffile``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from bcseg.errors import BadInputError
from pipeline.slide.base import Slide
from pipeline.slide.fingerprint import slide_fingerprint

__all__ = ["BACKENDS", "Slide", "open_slide", "slide_fingerprint"]

log = logging.getLogger(__name__)

BACKENDS = ("openslide", "tifffile", "image")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def open_slide(
    path: str | Path, mpp: float | None = None, backend: str | None = None, fill_bad_tiles: bool = False
) -> Slide:
    """Open a whole-slide image, a DICOM slide folder or a plain RGB image.

    ``mpp`` (microns per level-0 pixel) overrides the resolution in the metadata and is required
    when there is none. ``backend`` forces ``"openslide"``, ``"tifffile"`` or ``"image"``;
    None chooses one as the module docstring describes. ``fill_bad_tiles`` makes stored tiles
    that fail to decode read as white background, listed in ``Slide.bad_tiles``, instead of
    raising TileDecodeError.

    Raises BadInputError, with a message naming the path, when the file is missing, unreadable,
    empty, not a slide, in a pixel format or compression that cannot be decoded, or without a
    usable resolution.
    """
    path = Path(path)
    _check_readable(path)
    if path.is_file() and _is_tiff(path):
        _check_tiff_complete(path)
    if backend is None:
        return _open_detected(path, mpp, fill_bad_tiles)
    if backend not in BACKENDS:
        raise ValueError(f"unknown slide backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return _backend_class(backend)(path, mpp=mpp, fill_bad_tiles=fill_bad_tiles)


def choose_backend(path: Path) -> str:
    """Name the backend that ``open_slide`` tries first for ``path``."""
    if path.is_dir():
        return "openslide"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    slide_format = _openslide_format(path)
    if slide_format == "generic-tiff" and _openslide_misreads(path):
        return "tifffile"
    if slide_format is not None:
        return "openslide"
    if _is_tiff(path):
        return "tifffile"
    raise BadInputError(
        f"{path} is not a slide that can be read: OpenSlide does not recognize its format and it is "
        f"neither a TIFF file nor a {'/'.join(sorted(IMAGE_SUFFIXES))} image. The file may be damaged "
        "or truncated"
    )


def _open_detected(path: Path, mpp: float | None, fill_bad_tiles: bool) -> Slide:
    backend = choose_backend(path)
    if backend != "openslide" or path.is_dir() or not _is_tiff(path):
        return _backend_class(backend)(path, mpp=mpp, fill_bad_tiles=fill_bad_tiles)

    # A TIFF that OpenSlide fails to open (an unusual compression or layout) may still open in
    # tifffile. When both fail, tifffile's message is the more specific one for a generic TIFF,
    # and OpenSlide's for a vendor format.
    try:
        return _backend_class("openslide")(path, mpp=mpp, fill_bad_tiles=fill_bad_tiles)
    except BadInputError as openslide_error:
        if not _is_openslide_open_failure(openslide_error):
            raise
        log.info("%s: OpenSlide failed (%s); trying tifffile", path, openslide_error.__cause__)
        try:
            return _backend_class("tifffile")(path, mpp=mpp, fill_bad_tiles=fill_bad_tiles)
        except BadInputError:
            if _openslide_format(path) == "generic-tiff":
                raise
            raise openslide_error from None


def _backend_class(backend: str) -> type[Slide]:
    # Imported here so that importing this package does not load openslide or zarr.
    if backend == "openslide":
        from pipeline.slide.openslide_backend import OpenSlideBackend

        return OpenSlideBackend
    if backend == "tifffile":
        from pipeline.slide.tifffile_backend import TiffFileBackend

        return TiffFileBackend
    from pipeline.slide.image_backend import ImageBackend

    return ImageBackend


def _check_readable(path: Path) -> None:
    """Raise BadInputError for a missing, unreadable or empty file, or a folder without .dcm files."""
    if not path.exists():
        raise BadInputError(f"{path}: slide not found (no such file or folder)")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise BadInputError(f"{path}: permission denied; the folder cannot be listed")
        if not any(member.suffix.lower() == ".dcm" for member in path.iterdir()):
            raise BadInputError(
                f"{path} is a folder but not a DICOM slide (it contains no .dcm files); pass a slide "
                "file, or a folder with the .dcm files of one DICOM slide"
            )
        return
    try:
        with path.open("rb") as file:
            first_byte = file.read(1)
    except PermissionError as error:
        raise BadInputError(f"{path}: permission denied; the slide cannot be read by this user") from error
    except OSError as error:
        raise BadInputError(f"{path}: the slide cannot be read ({error.strerror or error})") from error
    if not first_byte:
        raise BadInputError(f"{path}: the file is empty (0 bytes); the copy or download probably failed")


def _check_tiff_complete(path: Path) -> None:
    """Raise BadInputError for a TIFF file cut short: no image directory, or image data past its end.

    Files that tifffile cannot parse at all pass, so that the backends report them.
    """
    import tifffile

    file_bytes = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tiff:
            pages = list(tiff.pages)
            data_end = max(
                (offset + count for page in pages for offset, count in zip(page.dataoffsets, page.databytecounts) if count),
                default=0,
            )
    except Exception:  # noqa: BLE001 - damaged files raise many kinds; the backends report them
        return
    if not pages:
        raise BadInputError(
            f"{path}: the TIFF file has no readable image directory ({file_bytes} bytes); it is truncated or "
            "damaged. Copy or download it again"
        )
    if data_end > file_bytes:
        raise BadInputError(
            f"{path}: the file is truncated: its image data runs to byte {data_end} but the file has only "
            f"{file_bytes} bytes. Copy or download it again"
        )


def _is_tiff(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) in TIFF_SIGNATURES


def _openslide_misreads(path: Path) -> bool:
    """Tell whether a TIFF that OpenSlide calls generic-tiff is better read with tifffile."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            # OpenSlide reads only top-level tiled pages, so it misses SubIFD pyramids. It also
            # converts grayscale and 16-bit pages to RGB silently, where the tifffile backend
            # rejects them with a message. In a sparse TIFF, the tifffile backend skips the tiles
            # the file leaves out, where OpenSlide composites them as transparent pixels, which
            # takes minutes for a large slide.
            rgb = page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR) and page.dtype == "uint8"
            sparse = 0 in page.databytecounts
            return bool(tiff.is_ome or page.subifds or not page.is_tiled or not rgb or sparse)
    except tifffile.TiffFileError:
        return False


def _openslide_format(path: Path) -> str | None:
    import openslide

    return openslide.OpenSlide.detect_format(path)


def _is_openslide_open_failure(error: BadInputError) -> bool:
    import openslide

    return isinstance(error.__cause__, openslide.OpenSlideError)
