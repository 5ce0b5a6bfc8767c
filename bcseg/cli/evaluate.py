"""``bcseg-wsi evaluate``: score a checkpoint on labelled regions, by whole-region inference and the pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Score CHECKPOINT on every image and mask pair of DATA_DIR (images/ and masks/ with matching
names; masks carry BCSS codes, or 255 tumour / 0 the rest with --binary). Each region is
segmented twice: by whole-region inference in memory, and by the whole-slide pipeline (tiles,
overlap, blending) run on the image file. Both are scored against the mask at its resolution,
with ignored codes counting nowhere, and the share of pixels where the two agree is reported.
Writes scores.json, per_class.csv, per_region.csv, confusion_<path>.csv and .png, and
model_card.json and model_card.md into --out.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("evaluate", help="score a checkpoint on labelled regions", description=DESCRIPTION)
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                        help="a .safetensors checkpoint, or 'default' for the bundled model")
    parser.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="folder with images/ and masks/")
    parser.add_argument("--out", type=Path, metavar="DIR", help="report folder (default: evaluation-<checkpoint name>); must not exist")
    parser.add_argument("--binary", action="store_true", help="masks are tumour versus rest (255 tumour, 0 the rest)")
    parser.add_argument("--sites", metavar="SITES", help="score only regions of these comma-separated TCGA sites, e.g. OL,LL,E2,EW,GM,S3")
    parser.add_argument("--data-mpp", type=float, metavar="MICRONS", help="resolution of images whose names lack '_MPP-<microns>'")
    parser.add_argument("--no-pipeline", action="store_true", help="score whole-region inference only")
    parser.add_argument("--tissue-detection", action="store_true",
                        help="let the pipeline path skip tiles it finds no tissue in (default: every tile, as the "
                             "annotated regions are scored in full)")
    parser.add_argument("--tile-size", type=int, metavar="PIXELS", help="pipeline tile size (default: as `bcseg-wsi run`, twice the checkpoint's tile size)")
    parser.add_argument("--overlap", type=int, default=None, metavar="PIXELS",
                        help="pipeline tile overlap (default: as `bcseg-wsi run`, a quarter of the tile size)")
    parser.add_argument("--blend", choices=("gaussian", "cosine", "constant"), default="gaussian",
                        help="pipeline blending of overlapping tiles (default gaussian)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="tiles per batch in the pipeline path (default: as `bcseg-wsi run`, auto)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    return parser


def execute(args: argparse.Namespace) -> int:
    from bcseg.evaluation import EvaluationSettings, evaluate

    checkpoint = None if str(args.checkpoint) == "default" else args.checkpoint
    name = "default" if checkpoint is None else checkpoint.stem
    settings = EvaluationSettings(
        checkpoint=checkpoint,
        data_dir=args.data_dir,
        out_dir=args.out or Path(f"evaluation-{name}"),
        binary=args.binary,
        data_mpp=args.data_mpp,
        sites=[site.strip() for site in args.sites.split(",") if site.strip()] if args.sites else None,
        pipeline=not args.no_pipeline,
        tissue_detection=args.tissue_detection,
        tile_size_px=args.tile_size,
        overlap_px=args.overlap,
        blend_mode=args.blend,
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads,
    )
    scores = evaluate(settings)
    print(format_scores(scores))
    print(f"report: {settings.out_dir}")
    return 0


def format_scores(scores: dict) -> str:
    lines = []
    for path, summary in scores["paths"].items():
        dice = ", ".join(f"{name} {value:.4f}" for name, value in summary["dice"].items() if value is not None)
        mean = summary["mean_dice"]
        lines.append(f"{path} path: Dice {dice}; mean {'n/a' if mean is None else f'{mean:.4f}'}; "
                     f"pixel accuracy {summary['pixel_accuracy']:.4f}")
    if scores["agreement"] is not None:
        lines.append(f"pipeline versus region agreement: {scores['agreement']:.4%} of scored pixels")
    return "\n".join(lines)
