"""One slide from file to outputs: the stages wired together, with an atomic output folder.

The output folder ``<out>/<slide name>/`` is built under a temporary name beside it and renamed
into place only when every output is written, with a ``COMPLETE`` record of the settings last.
A crash therefore never leaves a folder that looks finished, and an earlier complete result is
replaced only once its successor is complete.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Callable
import dataclasses
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from bcseg import __version__
from bcseg.classes import CLASSES
from bcseg.errors import BadInputError
from pipeline.export.geojson import OBJECT_TYPES

log = logging.getLogger(__name__)

COMPLETE_NAME = "COMPLETE"
# Choices for the origin of GeoJSON coordinates. "bounds": the top-left corner of a slide's bounds
# offset, where QuPath's OpenSlide reader starts the image by default. "full": the top-left corner
# of the full level-0 image, as openslide's read_region and QuPath with --no-crop have it.
GEOJSON_FRAMES = ("bounds", "full")
SUMMARY_NAME = "summary.json"
OVERLAY_MAX_PX = 2048  # maximum length of the longer side of overlay.png
# Label-map pixels the GeoJSON export traces at a time, at about 20 bytes each: 80 MB. Its
# default of 1024 rows took 256 MB on a label map 12,500 px wide.
GEOJSON_BAND_PIXELS = 4_000_000

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class RunSettings:
    """Everything that decides a slide's outputs, plus how to compute them (device, workers)."""

    out_dir: Path = Path("outputs")
    model_path: Path | None = None  # None: the bundled default model
    device: str = "auto"
    mpp_override: float | None = None  # slide resolution when its metadata lacks it or is wrong
    tile_size_px: int | None = None  # None: twice the checkpoint's tile size (see tiling_for)
    overlap_px: int | None = None  # None: a quarter of the tile size
    batch_size: int | None = None  # None: chosen for the device (pipeline.inference.choose_batch_size)
    workers: int = 4
    compile_model: bool = False
    threads: int | None = None  # torch CPU threads; None: every usable core
    tissue_detection: bool = True
    blend_mode: str = "gaussian"
    object_type: str = "annotation"
    geojson_frame: str = "bounds"  # one of GEOJSON_FRAMES
    geojson_gzip: bool = False
    simplify_um: float = 0.0
    min_area_um2: float = 0.0
    keep_tiles: bool = False
    overwrite: bool = False
    output_name: str | None = None  # folder name under out_dir; None: slide_output_name(slide)
    fill_bad_tiles: bool = False  # tiles that fail to decode become background; the result is partial
    allow_upsample: bool = False  # run slides much coarser than the model's resolution, with a warning

    def tiling_for(self, info) -> tuple[int, int]:
        """Return (tile size, overlap) in pixels at model resolution for a model's ``ModelInfo``.

        By default tiles are twice the tile size the checkpoint records (the size the model was
        validated at), overlapping by a quarter of their size. The model's receptive field spans
        several hundred pixels, so its prediction at a pixel changes with the context around it.
        With these defaults every pixel has at least an eighth of a tile of context, real or the
        white past the slide's edge. The bundled model's labels then agree with whole-region
        inference on 99.36 % and 99.08 % of the scored pixels of two BCSS regions
        (``bcseg-wsi evaluate``).
        """
        tile_size_px = self.tile_size_px or 2 * info.tile_size_px
        overlap_px = self.overlap_px if self.overlap_px is not None else tile_size_px // 4
        return tile_size_px, overlap_px

    def resolved(self, info) -> RunSettings:
        """Return a copy with the tile size and overlap filled in for a model's ``ModelInfo``."""
        tile_size_px, overlap_px = self.tiling_for(info)
        return dataclasses.replace(self, tile_size_px=tile_size_px, overlap_px=overlap_px)

    def output_affecting(self, tile_size_px: int) -> dict[str, Any]:
        """Return the settings that change the outputs, so equal values let a result be reused."""
        return {
            "mpp_override": self.mpp_override,
            "tile_size_px": tile_size_px,
            "overlap_px": self.overlap_px,
            "tissue_detection": self.tissue_detection,
            "blend_mode": self.blend_mode,
            "object_type": self.object_type,
            "geojson_gzip": self.geojson_gzip,
            "simplify_um": self.simplify_um,
            "min_area_um2": self.min_area_um2,
            "keep_tiles": self.keep_tiles,
            "fill_bad_tiles": self.fill_bad_tiles,
        }


@dataclass
class RunResult:
    slide_path: Path
    output_dir: Path
    status: str  # "done", "no_tissue" or "skipped"; summary["partial"] marks filled bad tiles
    summary: dict[str, Any] = field(default_factory=dict)


def slide_output_name(slide_path: Path) -> str:
    """Derive a slide's output folder name: its file name without slide suffixes, made path-safe."""
    name = slide_path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        if slide_path.suffix and not slide_path.is_dir():
            name = slide_path.stem
    # Path separators, control characters and a leading dot would escape or hide the folder.
    name = re.sub(r'[\x00-\x1f/\\:*?"<>|]', "_", name).strip().lstrip(".")
    return name or "slide"


def run_slide(slide_path: str | os.PathLike, settings: RunSettings, progress: Progress | None = None) -> RunResult:
    """Segment one slide and write its outputs under ``settings.out_dir``."""
    from bcseg.checkpoint import load_checkpoint
    from pipeline.inference import select_device
    from pipeline.slide import open_slide, slide_fingerprint
    from pipeline.slide.resolution import check_model_resolution

    slide_path = Path(slide_path)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # Checks first: slide, model, settings, output folder.
    slide = open_slide(slide_path, mpp=settings.mpp_override, fill_bad_tiles=settings.fill_bad_tiles)
    try:
        device = select_device(settings.device)
        loaded = load_checkpoint(settings.model_path, device=device)
        check_model_resolution(slide.path, slide.mpp, slide.mpp_source, loaded.info.mpp, settings.allow_upsample)
    except BaseException:
        slide.close()
        raise
    settings = settings.resolved(loaded.info)
    tile_size_px = settings.tile_size_px
    if settings.object_type not in OBJECT_TYPES:
        raise BadInputError(f"--object-type {settings.object_type!r} is not one of {', '.join(OBJECT_TYPES)}")
    if settings.geojson_frame not in GEOJSON_FRAMES:
        raise BadInputError(f"--geojson-frame {settings.geojson_frame!r} is not one of {', '.join(GEOJSON_FRAMES)}")
    fingerprint = slide_fingerprint(slide_path)
    record, record_key = complete_record(
        settings, tile_size_px, fingerprint, loaded.sha256, choose_geojson_box(slide, settings.geojson_frame)
    )
    output_dir = Path(settings.out_dir) / (settings.output_name or slide_output_name(slide_path))

    existing = read_complete_record(output_dir)
    if existing is not None and existing.get("key") == record_key and not settings.overwrite:
        log.info("%s: complete result with the same settings exists in %s; skipped", slide_path, output_dir)
        slide.close()
        return RunResult(slide_path, output_dir, "skipped", read_summary(output_dir))
    if output_dir.exists() and not settings.overwrite:
        slide.close()
        raise BadInputError(
            f"{output_dir} already exists with other settings, another model or another slide; "
            "pass --overwrite to replace it, or choose another --out"
        )

    created_out_dir = not Path(settings.out_dir).exists()
    work_dir = _make_work_dir(output_dir)
    try:
        with slide:
            summary = _run_stages(
                slide, slide_path, fingerprint, loaded, device, settings, tile_size_px, work_dir, timings, progress
            )
        summary["partial"] = bool(slide.bad_tiles)
        summary["bad_tiles"] = [dict(zip(("l0_x", "l0_y", "l0_width", "l0_height"), box)) for box in slide.bad_tiles]
        timings["total_s"] = time.perf_counter() - started
        summary["timings_s"] = {name: round(seconds, 3) for name, seconds in timings.items()}
        _write_json(work_dir / SUMMARY_NAME, summary)
        _write_json(
            work_dir / COMPLETE_NAME,
            {**record, "key": record_key, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        )
        _move_into_place(work_dir, output_dir)
    except BaseException as error:
        shutil.rmtree(work_dir, ignore_errors=True)
        if created_out_dir:
            _remove_if_empty(Path(settings.out_dir))
        disk_full = _disk_full_error(error)
        if disk_full is not None:
            raise BadInputError(
                f"{output_dir}: the disk is full ({disk_full}); no partial result was kept"
                + (" and the earlier result is unchanged" if output_dir.exists() else "")
                + ". Free some space or choose another --out"
            ) from error
        raise
    log.info("%s: outputs in %s (%.1f s)", slide_path, output_dir, timings["total_s"])
    return RunResult(slide_path, output_dir, summary["status"], summary)


def complete_record(
    settings: RunSettings,
    tile_size_px: int,
    fingerprint: str,
    model_sha256: str,
    l0_geojson_box: tuple[int, int, int, int] | None = None,
) -> tuple[dict[str, Any], str]:
    """Return the COMPLETE record of a result and its key; equal keys mean a result can be reused.

    ``l0_geojson_box`` is what ``choose_geojson_box`` returns for the slide and settings.
    """
    output_settings = settings.output_affecting(tile_size_px)
    # The GeoJSON frame enters the record only when it is not the full level-0 image. Records
    # written before the frame could be chosen stay valid for the slides whose GeoJSON it does
    # not change: those without a bounds offset.
    if l0_geojson_box is not None:
        output_settings["geojson_l0_box"] = list(l0_geojson_box)
    record = {
        "settings": output_settings,
        "slide_fingerprint": fingerprint,
        "model_sha256": model_sha256,
        "package_version": __version__,
    }
    return record, hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def choose_geojson_box(slide, frame: str) -> tuple[int, int, int, int] | None:
    """Return the level-0 (x, y, width, height) of the image that GeoJSON coordinates are measured
    in, or None when that is the slide's full level-0 image.

    Only the "bounds" frame of a slide with a bounds offset differs from the full image. QuPath's
    OpenSlide reader (OpenslideImageServer, QuPath 0.2 and later) adds (bounds-x, bounds-y) to
    every level-0 position it reads and reports bounds-width by bounds-height as the image size,
    unless the image was added with --no-crop.
    """
    if frame not in GEOJSON_FRAMES:
        raise ValueError(f"frame must be one of {', '.join(GEOJSON_FRAMES)}, got {frame!r}")
    if frame == "full" or slide.l0_bounds is None:
        return None
    if tuple(slide.l0_bounds) == (0, 0, *slide.dimensions):
        return None
    return tuple(slide.l0_bounds)


def _run_stages(slide, slide_path, fingerprint, loaded, device, settings, tile_size_px, work_dir, timings, progress) -> dict:
    from pipeline.inference import Predictor, choose_batch_size, predict_stream
    from pipeline.stitching import Merger
    from pipeline.tiling import TileGrid, TileStoreWriter, read_tiles, select_tissue_tiles
    from pipeline.tissue import detect_tissue, write_tissue_png

    def stage_progress(stage):
        return (lambda done, total: progress(stage, done, total)) if progress else None

    mpp = loaded.info.mpp
    m_width, m_height = slide.size_at_mpp(mpp)
    name = slide_output_name(slide_path)

    # Tissue detection on a low-resolution view.
    clock = time.perf_counter()
    tissue = None
    if settings.tissue_detection:
        tissue = detect_tissue(slide)
        write_tissue_png(tissue, work_dir / "tissue.png")
    _return_freed_memory()
    timings["tissue_s"] = time.perf_counter() - clock

    # Tiling: the overlapping grid, only tiles that touch tissue.
    clock = time.perf_counter()
    grid = TileGrid(m_width, m_height, tile_size_px, settings.overlap_px)
    m_origins = select_tissue_tiles(grid, tissue, mpp)
    log.info("%s: %d of %d tiles touch tissue", slide_path, len(m_origins), len(grid.m_origins()))
    timings["tiling_s"] = time.perf_counter() - clock

    # Reading, inference and blending run at once: reader threads decode tiles ahead of the
    # model, and a blending thread adds each batch's predictions while the next batch runs.
    # Chunks of the maps are finalized as soon as their last tile is in.
    clock = time.perf_counter()
    merger = Merger(
        work_dir / "prediction.zarr", m_width, m_height, loaded.info.num_classes, tile_size_px,
        blend_mode=settings.blend_mode, attrs={"mpp": mpp, "l0_per_px": mpp / slide.mpp},
        m_origins=m_origins, tissue=tissue, mpp=mpp,
    )
    if len(m_origins):
        predictor = Predictor(loaded, device, compile_model=settings.compile_model, threads=settings.threads)
        batch_size = choose_batch_size(predictor, tile_size_px, settings.batch_size)
        keep = None
        if settings.keep_tiles:
            keep = TileStoreWriter(work_dir / "tiles.zarr", slide, grid, m_origins, mpp,
                                   metadata={"slide_fingerprint": fingerprint}).write
        tiles = read_tiles(slide, m_origins, tile_size_px, mpp, workers=settings.workers,
                           max_ahead=2 * batch_size + settings.workers, on_tile=keep)
        predict_stream(tiles, predictor, merger.add, batch_size, len(m_origins), stage_progress("infer"))
    timings["inference_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    probabilities, labels = merger.finalize(progress=stage_progress("blend"))
    _return_freed_memory()
    timings["stitching_s"] = time.perf_counter() - clock

    # Export: polygons, label image, overlay, areas.
    clock = time.perf_counter()
    geojson_name, geojson_stats, areas = export_outputs(slide, labels, probabilities, mpp, settings, work_dir, name)
    timings["export_s"] = time.perf_counter() - clock

    status = "done" if len(m_origins) and areas["tissue_um2"] > 0 else "no_tissue"
    return {
        "status": status,
        "slide": {
            "path": str(slide_path),
            "fingerprint": fingerprint,
            "backend": slide.backend,
            "vendor": slide.vendor,
            "dimensions_px": list(slide.dimensions),
            "l0_bounds": list(slide.l0_bounds) if slide.l0_bounds else None,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "level_count": slide.level_count,
        },
        "model": {
            "path": str(loaded.path),
            "sha256": loaded.sha256,
            "weights_encoding": loaded.weights_encoding,
            "mpp": mpp,
            "provenance": loaded.info.provenance,
        },
        "settings": {**asdict(settings), "out_dir": str(settings.out_dir), "model_path": str(loaded.path),
                     "tile_size_px": tile_size_px, "device_used": str(device)},
        "label_map": {"width_px": m_width, "height_px": m_height, "mpp": mpp, "l0_per_px": mpp / slide.mpp},
        "tiles": {"total": int(len(grid.m_origins())), "with_tissue": int(len(m_origins))},
        "classes": areas["classes"],
        "tissue_area_um2": areas["tissue_um2"],
        "geojson": {**_jsonable({k: v for k, v in geojson_stats.items() if k != "path"}), "file": geojson_name},
        "tissue_mask": {"file": "tissue.png", "mpp": tissue.mpp} if tissue is not None else None,
        "outputs": sorted([geojson_name, "labels.tif", "overlay.png", SUMMARY_NAME, "prediction.zarr"]
                          + (["tissue.png"] if settings.tissue_detection else [])
                          + (["tiles.zarr"] if settings.keep_tiles and len(m_origins) else [])),
        "versions": _versions(),
    }


def export_outputs(slide, labels, probabilities, mpp: float, settings: RunSettings, work_dir: Path, name: str):
    """Write the GeoJSON, labels.tif and overlay.png of a finished label map; count class areas.

    Returns (GeoJSON file name, GeoJSON statistics, class areas).
    """
    from pipeline.export.geojson import write_geojson
    from pipeline.export.label_tiff import write_label_tiff
    from pipeline.export.overlay import downsample_labels, write_overlay

    geojson_name = f"{name}.geojson" + (".gz" if settings.geojson_gzip else "")
    l0_x, l0_y, l0_width, l0_height = choose_geojson_box(slide, settings.geojson_frame) or (0, 0, *slide.dimensions)
    geojson_stats = write_geojson(
        work_dir / geojson_name, labels, mpp / slide.mpp, mpp, probabilities=probabilities,
        object_type=settings.object_type, simplify_um=settings.simplify_um, min_area_um2=settings.min_area_um2,
        band_rows=max(64, min(1024, GEOJSON_BAND_PIXELS // labels.shape[1])),
        l0_image_size=(l0_width, l0_height), l0_origin=(l0_x, l0_y),
    )
    geojson_stats.update(frame=settings.geojson_frame, l0_origin=[l0_x, l0_y])
    write_label_tiff(work_dir / "labels.tif", labels, mpp)
    overlay_mpp = max(mpp, max(slide.dimensions) * slide.mpp / OVERLAY_MAX_PX)
    thumb_width, thumb_height = slide.size_at_mpp(overlay_mpp)
    thumbnail = slide.read_region_at_mpp(0, 0, thumb_width, thumb_height, overlay_mpp)
    write_overlay(work_dir / "overlay.png", thumbnail, downsample_labels(labels, thumb_width, thumb_height))
    return geojson_name, geojson_stats, class_areas(labels, mpp)


def class_areas(labels, mpp: float, band_rows: int = 512, count_rows: int = 64) -> dict[str, Any]:
    """Area in square microns and fraction of tissue per class, counted band by band.

    Bands of ``band_rows`` are read at once, and counted ``count_rows`` at a time because
    ``np.bincount`` widens its input to 64-bit integers.
    """
    counts = np.zeros(256, dtype=np.int64)
    for row in range(0, labels.shape[0], band_rows):
        band = np.asarray(labels[row : row + band_rows])
        for sub_row in range(0, band.shape[0], count_rows):
            counts += np.bincount(band[sub_row : sub_row + count_rows].ravel(), minlength=256)
    pixel_um2 = mpp * mpp
    tissue_pixels = int(sum(counts[c.label] for c in CLASSES))
    classes = {
        c.name: {
            "qupath_name": c.qupath_name,
            "area_um2": round(float(counts[c.label] * pixel_um2), 2),
            "fraction_of_tissue": round(float(counts[c.label] / tissue_pixels), 6) if tissue_pixels else 0.0,
        }
        for c in CLASSES
    }
    return {"classes": classes, "tissue_um2": round(tissue_pixels * pixel_um2, 2)}


def _disk_full_error(error: BaseException) -> OSError | None:
    """Return the no-space or quota OSError that caused ``error``, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def _return_freed_memory() -> None:
    """Ask glibc to return freed heap memory to the system; does nothing without glibc.

    Large temporary arrays, such as the tissue view, otherwise stay in the heap after they are
    freed, and the next stage's peak adds to them. After the tissue detection of a 100,000 x
    80,000 px slide, 90 of 150 MB came back.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _make_work_dir(output_dir: Path) -> Path:
    parent = output_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_work_dirs(output_dir)
        work_dir = parent / f".{output_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        work_dir.mkdir()
    except PermissionError as error:
        raise BadInputError(f"{parent}: output folder is not writable; choose another --out") from error
    except OSError as error:
        raise BadInputError(
            f"{parent}: cannot create the output folder there ({error.strerror}); choose another --out"
        ) from error
    return work_dir


def remove_stale_work_dirs(output_dir: Path) -> None:
    """Remove temporary folders of this slide left by runs whose process no longer exists."""
    for candidate in output_dir.parent.glob(f".{glob_escape(output_dir.name)}.partial-*"):
        match = re.search(r"\.partial-(\d+)-", candidate.name)
        if match and not _process_alive(int(match.group(1))):
            log.info("removing %s left by an interrupted run", candidate)
            shutil.rmtree(candidate, ignore_errors=True)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty, or already gone
        pass


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(work_dir: Path, output_dir: Path) -> None:
    """Rename the finished folder into place; an older result is removed only after that."""
    if output_dir.exists():
        retired = output_dir.parent / f".{output_dir.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(output_dir, retired)
        os.replace(work_dir, output_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(work_dir, output_dir)


def read_complete_record(output_dir: Path) -> dict | None:
    """Return the COMPLETE record in ``output_dir``, or None when there is no readable one."""
    try:
        return json.loads((output_dir / COMPLETE_NAME).read_text())
    except (OSError, ValueError):
        return None


def read_summary(output_dir: Path) -> dict:
    try:
        return json.loads((output_dir / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"bcseg-wsi": __version__, "python": platform.python_version()}
    for package in ("torch", "torchvision", "openslide-python", "openslide-bin", "tifffile", "zarr", "shapely", "rasterio"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions
