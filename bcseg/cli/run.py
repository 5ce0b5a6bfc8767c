"""``bcseg-wsi run SLIDE``: segment one slide and write its output folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # the same values pipeline.inference.select_device takes
BLEND_CHOICES = ("gaussian", "cosine", "constant")  # pipeline.stitching.BLEND_MODES
OBJECT_TYPE_CHOICES = ("annotation", "detection")  # pipeline.run.OBJECT_TYPES
GEOJSON_FRAME_CHOICES = ("bounds", "full")  # pipeline.run.GEOJSON_FRAMES


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run",
        help="segment one slide",
        description="Segment one whole-slide image into tumor, stroma, inflammatory, necrosis and other "
        "tissue. Writes OUT/<slide name>/ with GeoJSON polygons for QuPath, labels.tif, overlay.png, "
        "tissue.png and summary.json.",
    )
    parser.add_argument("slide", type=Path, help="slide file (.svs, .ndpi, .mrxs, .tif, .dcm folder, .png, ...)")
    parser.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR", help="output folder (default: outputs)")
    add_settings_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="redo the slide even if a complete result exists")
    return parser


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that set RunSettings, shared by ``run`` and ``batch``."""
    parser.add_argument("--model", type=Path, default=None, metavar="PATH",
                        help="model checkpoint (.safetensors); default: the bundled demonstration model")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="where the model runs; auto picks CUDA when present (default: auto)")
    parser.add_argument("--mpp", type=float, default=None, metavar="MICRONS",
                        help="slide resolution in microns per pixel; overrides the slide's metadata and is "
                        "required for images without it (PNG, JPEG)")
    parser.add_argument("--tile-size", type=int, default=None, metavar="PIXELS",
                        help="tile size at the model's resolution (default: twice the tile size the model's checkpoint records)")
    parser.add_argument("--overlap", type=int, default=None, metavar="PIXELS",
                        help="overlap between neighbouring tiles at the model's resolution (default: a quarter of the tile size)")
    parser.add_argument("--batch-size", type=batch_size_value, default=None, metavar="N|auto",
                        help="tiles per model batch; auto picks one 1024 px tile (four 512 px) on the CPU and fills the free GPU memory on "
                        "CUDA (default: auto)")
    parser.add_argument("--workers", type=int, default=4, metavar="N",
                        help="threads decoding tiles ahead of the model (default: 4)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for the model (default: every usable core)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model with torch.compile; the first batch waits for the compilation")
    parser.add_argument("--no-tissue-detection", action="store_true",
                        help="send every tile to the model, background included")
    parser.add_argument("--blend", choices=BLEND_CHOICES, default="gaussian",
                        help="weighting of overlapping tile predictions (default: gaussian)")
    parser.add_argument("--object-type", choices=OBJECT_TYPE_CHOICES, default="annotation",
                        help="QuPath object type of the exported regions (default: annotation)")
    parser.add_argument("--geojson-frame", choices=GEOJSON_FRAME_CHOICES, default="bounds",
                        help="origin of the GeoJSON coordinates for a slide with a bounds offset (MRXS, Leica "
                        "SCN): bounds puts it at the corner of the bounds, as QuPath shows such a slide by "
                        "default; full keeps the full level-0 frame, as QuPath with --no-crop and openslide "
                        "read_region have it. Other slides are the same either way (default: bounds)")
    parser.add_argument("--gzip", action="store_true", help="write <slide>.geojson.gz instead of .geojson")
    parser.add_argument("--simplify", type=float, default=0.0, metavar="MICRONS",
                        help="simplify polygons with this tolerance in microns (default: 0, exact pixel edges)")
    parser.add_argument("--min-area", type=float, default=0.0, metavar="UM2",
                        help="drop regions smaller than this area in square microns (default: 0)")
    parser.add_argument("--keep-tiles", action="store_true", help="keep tiles.zarr in the output folder")
    parser.add_argument("--fill-bad-tiles", action="store_true",
                        help="treat stored tiles that fail to decode as background instead of failing; the "
                        "result is marked partial and summary.json lists the tiles")
    parser.add_argument("--allow-upsample", action="store_true",
                        help="run a slide more than 2 times coarser than the model's resolution, "
                        "enlarging it, with a warning (default: reject it)")


def batch_size_value(text: str) -> int | None:
    """Parse --batch-size: a whole number, or "auto" (returned as None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {text!r}") from None


def execute(args: argparse.Namespace) -> int:
    from pipeline.run import run_slide

    settings = settings_from_args(args, overwrite=args.overwrite)
    with StageBars(enabled=not args.quiet) as bars:
        result = run_slide(args.slide, settings, progress=bars.update)

    summary = result.summary
    if result.status == "skipped":
        print(f"{result.slide_path}: skipped, a complete result with the same settings is in {result.output_dir}")
        return 0
    partial = " (partial)" if summary.get("partial") else ""
    print(f"{result.slide_path}: {result.status}{partial} -> {result.output_dir}")
    if summary.get("partial"):
        print(f"  partial: {len(summary['bad_tiles'])} tile(s) failed to decode and were filled as background; "
              f"their level-0 boxes are listed under bad_tiles in {result.output_dir / 'summary.json'}")
    for name, values in summary.get("classes", {}).items():
        print(f"  {name:<13} {values['area_um2'] / 1e6:10.4f} mm^2  {100 * values['fraction_of_tissue']:5.1f}% of tissue")
    if "timings_s" in summary:
        print(f"  time: {summary['timings_s'].get('total_s', 0):.1f} s")
    return 0


def settings_from_args(args: argparse.Namespace, **overrides):
    """Check the options added by add_settings_options and build RunSettings from them.

    Raises BadInputError for a value out of range, before any slide is read.
    """
    from bcseg.errors import BadInputError
    from pipeline.run import RunSettings

    for option, value, minimum in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 1),
                                   ("--threads", args.threads, 1), ("--overlap", args.overlap, 0)):
        if value is not None and value < minimum:
            raise BadInputError(f"{option} must be at least {minimum}, got {value}")
    if args.mpp is not None and not 0 < args.mpp:
        raise BadInputError(f"--mpp must be a positive number of microns per pixel, got {args.mpp}")
    if args.tile_size is not None and args.tile_size < 16:
        raise BadInputError(f"--tile-size must be at least 16 pixels, got {args.tile_size}")
    for option, value in (("--simplify", args.simplify), ("--min-area", args.min_area)):
        if not value >= 0:
            raise BadInputError(f"{option} must be 0 or more, got {value}")

    return RunSettings(
        out_dir=args.out,
        model_path=args.model,
        device=args.device,
        mpp_override=args.mpp,
        tile_size_px=args.tile_size,
        overlap_px=args.overlap,
        batch_size=args.batch_size,
        workers=args.workers,
        compile_model=args.compile,
        threads=args.threads,
        tissue_detection=not args.no_tissue_detection,
        blend_mode=args.blend,
        object_type=args.object_type,
        geojson_frame=args.geojson_frame,
        geojson_gzip=args.gzip,
        simplify_um=args.simplify,
        min_area_um2=args.min_area,
        keep_tiles=args.keep_tiles,
        fill_bad_tiles=args.fill_bad_tiles,
        allow_upsample=args.allow_upsample,
        **overrides,
    )


class StageBars:
    """One tqdm progress bar per pipeline stage, on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr is not None
        self.bars = {}

    def update(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            unit = "chunk" if stage == "blend" else "tile"
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:<10}", unit=unit, leave=True, file=sys.stderr)
        if bar.disable:  # closed once its stage finished
            return
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for bar in self.bars.values():
            bar.close()


