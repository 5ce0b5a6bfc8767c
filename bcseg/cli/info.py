"""``bcseg-wsi info``: print how the pipeline reads a slide, without running anything."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "info",
        help="show a slide's backend, levels, resolution and fingerprint",
        description="Open a slide the way 'bcseg-wsi run' does and print its backend, vendor, pyramid "
        "levels, base resolution and where it came from, associated images and input fingerprint.",
    )
    parser.add_argument("slide", metavar="SLIDE", help="slide file, or folder of one DICOM slide")
    parser.add_argument(
        "--mpp",
        type=float,
        metavar="MICRONS",
        help="level-0 resolution in microns per pixel; overrides the slide's metadata and is required "
        "when the slide has none (PNG, JPEG, some TIFF files)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def execute(args: argparse.Namespace) -> int:
    from pipeline.slide import open_slide, slide_fingerprint

    with open_slide(args.slide, mpp=args.mpp) as slide:
        info = slide_info(slide)
    info["fingerprint"] = slide_fingerprint(args.slide)

    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def slide_info(slide) -> dict:
    """Describe an open slide as a JSON-ready dict."""
    return {
        "path": str(slide.path),
        "backend": slide.backend,
        "vendor": slide.vendor,
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "levels": [
            {"level": level, "width": width, "height": height, "downsample": downsample, "mpp": slide.mpp * downsample}
            for level, ((width, height), downsample) in enumerate(zip(slide.level_dimensions, slide.level_downsamples))
        ],
        "associated_images": list(slide.associated_image_names),
        "l0_bounds": list(slide.l0_bounds) if slide.l0_bounds else None,
    }


def format_info(info: dict) -> str:
    """Render ``slide_info`` output (plus a fingerprint) as aligned text."""
    lines = [
        f"slide        {info['path']}",
        f"backend      {info['backend']}",
        f"vendor       {info['vendor']}",
        f"mpp          {info['mpp']:g} microns per pixel (from {info['mpp_source']})",
        "levels       level  width x height   downsample  mpp",
    ]
    for level in info["levels"]:
        size = f"{level['width']} x {level['height']}"
        lines.append(f"             {level['level']:<5}  {size:<15}  {level['downsample']:<10.4f}  {level['mpp']:.4g}")
    lines.append(f"associated   {', '.join(info['associated_images']) or 'none'}")
    if info.get("l0_bounds"):
        x, y, width, height = info["l0_bounds"]
        lines.append(f"bounds       {width} x {height} at level-0 x={x}, y={y} (the scanned area)")
    if "fingerprint" in info:
        lines.append(f"fingerprint  {info['fingerprint']}")
    return "\n".join(lines)
