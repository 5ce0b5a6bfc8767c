"""The slides of a batch: found in a folder tree, or read from a CSV or text list.

A folder is searched recursively for files with a whole-slide suffix (SLIDE_SUFFIXES); a folder
that directly contains ``.dcm`` files is one DICOM slide and is not searched further. Hidden
files and folders, and the batch's own output folder, are left out. Plain PNG and JPEG images are
not collected from folders, because slide folders often hold label and macro pictures next to
the slides; list them in a list file to process them.

A list file is either a CSV file (``.csv``) with a header row that names a ``path`` column and
optionally an ``mpp`` column, or a text file with one path per line (blank lines and lines
starting with ``#`` are ignored). Relative paths are taken from the list file's folder.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from bcseg.errors import BadInputError

log = logging.getLogger(__name__)

# Suffixes of the whole-slide formats that openslide and tifffile read.
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".qptiff"}
)
DICOM_SUFFIX = ".dcm"


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a batch: its path and, when given, its resolution overriding the metadata."""

    path: Path
    mpp: float | None = None


def collect_slides(input_path: Path, out_dir: Path) -> list[SlideEntry]:
    """Return the slides named by ``input_path`` (a folder or a list file), sorted by path.

    Raises BadInputError when the input does not exist, a list file is malformed, or no slide
    is found.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise BadInputError(f"{input_path}: not found; pass a folder of slides or a CSV or text list of slide paths")
    if input_path.is_dir() and not _is_dicom_folder(input_path):
        entries = find_slides(input_path, exclude=Path(out_dir))
    elif input_path.is_file() and input_path.suffix.lower() not in SLIDE_SUFFIXES | {DICOM_SUFFIX}:
        entries = read_slide_list(input_path)
    else:
        entries = [SlideEntry(input_path.absolute())]
    if not entries:
        raise BadInputError(
            f"{input_path}: no slides found (searched for {', '.join(sorted(SLIDE_SUFFIXES))} files and "
            "folders of .dcm files); pass another folder, or a list file of slide paths"
        )
    return entries


def find_slides(folder: Path, exclude: Path | None = None) -> list[SlideEntry]:
    """Find the slide files and DICOM slide folders below ``folder``, leaving out ``exclude``."""
    folder = Path(folder).absolute()
    excluded = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        kept_dirs = []
        for name in sorted(dirs):
            child = root_path / name
            if name.startswith(".") or (excluded is not None and child.resolve() == excluded):
                continue
            if _is_dicom_folder(child):
                found.append(child)
            else:
                kept_dirs.append(name)
        dirs[:] = kept_dirs
        found.extend(
            root_path / name
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in SLIDE_SUFFIXES
        )
    return [SlideEntry(path) for path in sorted(found)]


def read_slide_list(list_path: Path) -> list[SlideEntry]:
    """Read a CSV list (``path`` and optional ``mpp`` columns) or a text list of slide paths.

    Paths that appear twice are kept once. Raises BadInputError, naming the file and line, for
    a CSV file without a ``path`` column or with an mpp that is not a positive number.
    """
    list_path = Path(list_path)
    base = list_path.absolute().parent
    try:
        text = list_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"{list_path}: the slide list cannot be read ({error}); pass a UTF-8 text or CSV file") from error

    if list_path.suffix.lower() == ".csv":
        rows = _read_csv_rows(list_path, text)
    else:
        rows = [
            (number, line.strip(), None)
            for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")
        ]

    entries: list[SlideEntry] = []
    seen: set[Path] = set()
    for number, raw_path, raw_mpp in rows:
        path = Path(raw_path).expanduser()
        path = path if path.is_absolute() else base / path
        path = Path(os.path.normpath(path))
        if path in seen:
            log.warning("%s line %d: %s is listed again; processed once", list_path, number, path)
            continue
        seen.add(path)
        entries.append(SlideEntry(path, _parse_mpp(raw_mpp, list_path, number)))
    return entries


def _read_csv_rows(list_path: Path, text: str) -> list[tuple[int, str, str | None]]:
    reader = csv.DictReader(text.splitlines())
    columns = {name.strip().lower(): name for name in reader.fieldnames or []}
    if "path" not in columns:
        raise BadInputError(
            f"{list_path}: a CSV slide list needs a header row with a 'path' column (and optionally 'mpp'); "
            f"found columns {reader.fieldnames}"
        )
    rows = []
    for row in reader:
        raw_path = (row.get(columns["path"]) or "").strip()
        if raw_path:
            raw_mpp = row.get(columns["mpp"]) if "mpp" in columns else None
            rows.append((reader.line_num, raw_path, raw_mpp))
    return rows


def _parse_mpp(raw: str | None, list_path: Path, line_number: int) -> float | None:
    if raw is None or not raw.strip():
        return None
    try:
        mpp = float(raw)
    except ValueError:
        mpp = math.nan
    if not (math.isfinite(mpp) and mpp > 0):
        raise BadInputError(
            f"{list_path} line {line_number}: mpp {raw.strip()!r} is not a positive number of microns per "
            "pixel; correct it or leave the cell empty to use the slide's metadata"
        )
    return mpp


def _is_dicom_folder(path: Path) -> bool:
    try:
        return any(child.suffix.lower() == DICOM_SUFFIX and child.is_file() for child in path.iterdir())
    except OSError:
        return False
