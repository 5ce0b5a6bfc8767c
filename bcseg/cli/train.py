"""``bcseg-wsi train``: train a segmentation model on BCSS-style image and mask folders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bcseg.errors import BadInputError


DESCRIPTION = """\
Train DeepLabV3-ResNet50 on folders holding images/ and masks/ with matching file names (masks
carry BCSS label codes 0..21; codes 0 and 7 are ignored). The backbone starts from random
weights: no pretrained (ImageNet) weights are downloaded or bundled. Writes RUN_DIR/last.safetensors,
RUN_DIR/best.safetensors (best validation tumour Dice) and RUN_DIR/metrics.jsonl.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a model on labelled regions", description=DESCRIPTION)
    parser.add_argument("data_dirs", nargs="+", type=Path, metavar="DATA_DIR", help="folder with images/ and masks/")
    parser.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="folder for checkpoints and metrics")
    parser.add_argument("--mpp", type=float, default=0.5, metavar="MICRONS",
                        help="model resolution in microns per pixel (default 0.5, as the bundled model)")
    parser.add_argument("--data-mpp", type=float, metavar="MICRONS",
                        help="resolution of data files whose names lack an '_MPP-<microns>' part")
    parser.add_argument("--tile-size", type=int, default=256, metavar="PX", help="training patch side at model resolution (default 256)")
    parser.add_argument("--inference-tile-size", type=int, default=512, metavar="PX",
                        help="tile side recorded in the checkpoint for inference (default 512)")
    parser.add_argument("--steps", type=int, default=1000, help="optimization steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=4, help="patches per step (default 4)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    parser.add_argument("--warmup-steps", type=int, metavar="STEPS", help="linear warm-up steps (default 5%% of --steps)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed and threads repeat a run")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--val-dir", type=Path, metavar="DIR", help="validation folder with images/ and masks/")
    parser.add_argument("--val-binary", action="store_true",
                        help="validation masks are tumour-versus-rest (255 tumour, 0 the rest); score tumour Dice")
    parser.add_argument("--val-every", type=int, default=50, metavar="STEPS", help="validate and save every STEPS steps (default 50)")
    parser.add_argument("--max-minutes", type=float, metavar="MINUTES", help="stop, validate and save after this much time")
    parser.add_argument("--init-from", type=Path, metavar="CHECKPOINT", help="start from these weights instead of random ones")
    parser.add_argument("--bcss-groups", type=Path, metavar="JSON",
                        help='code-to-class table, e.g. {"0": null, "1": "tumor", ...}; default: bcseg.classes')
    parser.add_argument("--compact-out", type=Path, metavar="PATH", help="also write an int8 compact copy of the best checkpoint")
    return parser


def execute(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bcseg.training import TrainConfig, train

    config = TrainConfig(
        data_dirs=args.data_dirs,
        out_dir=args.out,
        mpp=args.mpp,
        tile_size=args.tile_size,
        inference_tile_size=args.inference_tile_size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        threads=args.threads,
        data_mpp=args.data_mpp,
        val_dir=args.val_dir,
        val_binary=args.val_binary,
        val_every=args.val_every,
        max_minutes=args.max_minutes,
        init_from=args.init_from,
        compact_out=args.compact_out,
    )
    if args.bcss_groups:
        config.groups = read_groups(args.bcss_groups)

    # The bar is drawn only on a terminal; log files get the periodic log lines instead.
    with tqdm(total=args.steps, unit="step", disable=args.quiet or not sys.stderr.isatty()) as bar:
        def progress(step: int, steps: int, loss: float) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}")

        result = train(config, progress)
    score = "n/a" if result.best_score is None else f"{result.best_score:.4f}"
    print(f"trained {result.steps_done} steps ({result.seconds_per_step:.2f} s/step); "
          f"best tumour Dice {score}; {result.best_path}")
    return 0


def read_groups(path: Path) -> dict[int, str | None]:
    """Read a BCSS code-to-class table from JSON: keys are codes, values class names or null."""
    from bcseg.classes import CLASS_NAMES

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        groups = {int(code): group for code, group in raw.items()}
    except (OSError, ValueError, AttributeError) as error:
        raise BadInputError(f"{path}: cannot read the code table ({error}); expected a JSON object of code: class") from error
    for code, group in groups.items():
        if not 0 <= code <= 255 or (group is not None and group not in CLASS_NAMES):
            raise BadInputError(
                f"{path}: invalid entry {code}: {group!r}; codes are 0..255 and classes are {', '.join(CLASS_NAMES)} or null"
            )
    return groups
