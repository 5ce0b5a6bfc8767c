"""Writers of a slide's results: GeoJSON polygons for QuPath, a pyramidal label TIFF, an overlay PNG.

Each writer reads the label map band by band, so memory stays bounded on large slides, and writes
to a temporary name that it renames when the file is complete. The writers live in their own
modules (``pipeline.export.geojson``, ``pipeline.export.label_tiff``, ``pipeline.export.overlay``)
so that importing one does not load the libraries of the others.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` and rename it to ``path`` when the block succeeds.

    A reader never sees a partly written ``path``. When the block raises, the temporary file is
    removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
