"""One output folder name per slide of a batch: unique, path-safe and stable between runs.

A slide's folder is named after its file (``pipeline.run.slide_output_name``: suffix removed,
path separators and control characters replaced, no leading dot), normalized to Unicode NFC and
cut to MAX_NAME_BYTES of UTF-8. Names are compared case-insensitively, as macOS and Windows file
systems compare them. Colliding names get a suffix made from a hash of the slide's path, so a
slide keeps its name whatever else is in the batch. An existing output folder keeps the
slide it was made from, recognised by its recorded path or fingerprint, even when a new
colliding slide sorts first; a folder made from another slide is never reused.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from pipeline.run import read_complete_record, read_summary, slide_output_name

log = logging.getLogger(__name__)

# File systems limit a name to 255 bytes, and run_slide builds the folder under
# ".<name>.partial-<pid>-<8 hex>", about 40 bytes longer.
MAX_NAME_BYTES = 180
HASH_CHARS = 8


def assign_output_names(
    slide_paths: list[Path],
    out_dir: Path,
    reserved: frozenset[str] = frozenset(),
    fingerprint: Callable[[Path], str | None] | None = None,
) -> list[str]:
    """Return one distinct folder name under ``out_dir`` for each of ``slide_paths``, in order.

    ``reserved`` names (the batch's own files) are never given out. ``fingerprint`` returns a
    slide's fingerprint; it is called only when an existing folder has the name a slide wants and
    records another path, to recognise a slide that has moved.
    """
    bases = [_base_name(path) for path in slide_paths]
    groups: dict[str, list[int]] = defaultdict(list)
    for index, base in enumerate(bases):
        groups[base.casefold()].append(index)

    names: list[str | None] = [None] * len(slide_paths)
    taken = {name.casefold() for name in reserved}
    for members in groups.values():
        # The slide that made an existing folder keeps it; otherwise the first in path order.
        owner = _existing_owner(members, slide_paths, bases, out_dir, fingerprint)
        for index in sorted(members, key=lambda i: (i != owner, i)):
            base = bases[index]
            plain_free = base.casefold() not in taken and (
                index == owner or not _belongs_to_other_slide(out_dir / base, slide_paths[index], fingerprint)
            )
            name = base if plain_free else _suffixed_name(base, slide_paths[index], taken)
            taken.add(name.casefold())
            names[index] = name
    for name in names:
        _check_inside(out_dir, name)
    return [name for name in names if name is not None]


def _base_name(slide_path: Path) -> str:
    name = unicodedata.normalize("NFC", slide_output_name(slide_path))
    return _truncate_utf8(name, MAX_NAME_BYTES)


def _truncate_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8", "surrogateescape")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", "ignore").rstrip() or "slide"


def _suffixed_name(base: str, slide_path: Path, taken: set[str]) -> str:
    digest = hashlib.sha256(str(slide_path).encode("utf-8", "surrogateescape")).hexdigest()
    stem = _truncate_utf8(base, MAX_NAME_BYTES - HASH_CHARS - 4)
    name = f"{stem}-{digest[:HASH_CHARS]}"
    counter = 2
    while name.casefold() in taken:  # two paths whose hashes share the first 8 characters
        name = f"{stem}-{digest[:HASH_CHARS]}-{counter}"
        counter += 1
    return name


def _existing_owner(members, slide_paths, bases, out_dir, fingerprint) -> int | None:
    folder = out_dir / bases[members[0]]
    if not folder.exists():
        return members[0]
    for index in members:
        if not _belongs_to_other_slide(folder, slide_paths[index], fingerprint):
            return index
    return None


def _belongs_to_other_slide(folder: Path, slide_path: Path, fingerprint) -> bool:
    """Tell whether ``folder`` exists and is not a result of ``slide_path``.

    A folder without a summary was not written by run_slide, which never leaves an unfinished
    folder under its final name, so it is left alone.
    """
    if not folder.exists() and not folder.is_symlink():
        return False
    if folder.is_symlink() or not folder.is_dir():
        return True
    recorded = _recorded_path(folder)
    if recorded is None:
        return True
    if recorded == slide_path:
        return False
    record = read_complete_record(folder) or {}
    if fingerprint is None or record.get("slide_fingerprint") is None:
        return True
    return fingerprint(slide_path) != record["slide_fingerprint"]


def _recorded_path(folder: Path) -> Path | None:
    path = read_summary(folder).get("slide", {}).get("path")
    return Path(path) if path else None


def _check_inside(out_dir: Path, name: str) -> None:
    # slide_output_name already replaces separators and strips leading dots; this guards the rule.
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"output folder name {name!r} is not a plain folder name")
    if (out_dir / name).parent != out_dir:
        raise ValueError(f"output folder name {name!r} would leave {out_dir}")
