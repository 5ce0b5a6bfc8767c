"""A quick fingerprint of a slide file, to tell whether an earlier result belongs to the same input.

It hashes the size and the first and last MiB of each file, not every byte, so it costs the same
for a 50 GB slide as for a small one. It is not a content hash: two files of the same size that
differ only in their middle get the same fingerprint. Slide formats keep their header or tile
directory near one end of the file, so a rescan or a re-export changes the fingerprint in practice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 1 << 20


def slide_fingerprint(path: str | Path) -> str:
    """Return ``"sha256:<hex>"`` over the size and the first and last MiB of the slide.

    For a folder (a DICOM slide) the hash runs over its files in sorted name order, each
    contributing its name, size and first and last MiB.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for member in sorted(child for child in path.iterdir() if child.is_file()):
            digest.update(member.name.encode("utf-8", "surrogateescape") + b"\0")
            _update_with_file(digest, member)
    else:
        _update_with_file(digest, path)
    return f"sha256:{digest.hexdigest()}"


def _update_with_file(digest, path: Path) -> None:
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with path.open("rb") as file:
        digest.update(file.read(CHUNK_BYTES))
        if size > CHUNK_BYTES:
            file.seek(max(CHUNK_BYTES, size - CHUNK_BYTES))
            digest.update(file.read(CHUNK_BYTES))
