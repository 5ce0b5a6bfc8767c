"""``bcseg-wsi train``: train a segmentation model on BCSS-style image and mask folders."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bcseg.errors import BadInputError

EXIT_TERMINATED = 143  # 128 + SIGTERM
from bcseg.training.splits import DEFAULT_TEST_SITES


DESCRIPTION = """\
Train DeepLabV3-ResNet50 on BCSS-format folders: images/ and masks/ with matching file names,
masks carrying BCSS label codes 0..21 (codes 0 and 7 are ignored). Regions are split by the
tissue-source site in their TCGA names: the test sites are held out, and validation sites are
drawn from the rest. Nothing is downloaded: the backbone starts from random weights unless
--backbone-weights names a local torchvision ResNet-50 state dict. RUN_DIR receives config.json,
split.json, state.pt (for --resume), last.safetensors, best.safetensors (best validation mean
Dice, or tumour Dice with --val-binary), metrics.jsonl, metrics.csv and metrics.png. Under
torchrun every process trains on its own GPU and the gradients are averaged.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a model on labelled regions", description=DESCRIPTION)
    parser.add_argument("data_dirs", nargs="*", type=Path, metavar="DATA_DIR", help="folder with images/ and masks/")
    parser.add_argument("--out", type=Path, metavar="RUN_DIR", help="folder for checkpoints and metrics (required unless --resume)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last saved state, with its own settings")

    data = parser.add_argument_group("data and splits")
    data.add_argument("--mpp", type=float, default=0.5, metavar="MICRONS",
                      help="model resolution in microns per pixel (default 0.5, as the bundled model)")
    data.add_argument("--data-mpp", type=float, metavar="MICRONS",
                      help="resolution of data files whose names lack an '_MPP-<microns>' part")
    data.add_argument("--test-sites", default=",".join(DEFAULT_TEST_SITES), metavar="SITES",
                      help="comma-separated TCGA tissue-source sites held out as the test split (default %(default)s; '' for none)")
    data.add_argument("--val-sites", metavar="SITES", help="comma-separated sites for validation (default: drawn by --seed)")
    data.add_argument("--val-fraction", type=float, default=0.2, metavar="FRACTION",
                      help="share of the non-test regions drawn, by whole sites, for validation (default 0.2)")
    data.add_argument("--split-file", type=Path, metavar="JSON", help="use this split (the split.json layout) instead")
    data.add_argument("--val-dir", type=Path, metavar="DIR", help="extra validation folder with images/ and masks/")
    data.add_argument("--val-binary", action="store_true",
                      help="--val-dir masks are tumour-versus-rest (255 tumour, 0 the rest); score tumour Dice")
    data.add_argument("--bcss-groups", type=Path, metavar="JSON",
                      help='code-to-class table, e.g. {"0": null, "1": "tumor", ...}; default: bcseg.classes')

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--epochs", type=int, default=40, help="epochs (default 40)")
    recipe.add_argument("--patches-per-epoch", type=int, metavar="N",
                        help="patches per epoch (default: labelled training area divided by the patch area)")
    recipe.add_argument("--tile-size", type=int, default=256, metavar="PX", help="training patch side at model resolution (default 256)")
    recipe.add_argument("--inference-tile-size", type=int, default=512, metavar="PX",
                        help="tile size recorded in the checkpoint; validation windows and the pipeline's default "
                        "tiles are twice this (default 512)")
    recipe.add_argument("--batch-size", type=int, default=4, help="patches per process per micro-batch (default 4)")
    recipe.add_argument("--accumulation-steps", type=int, default=1, metavar="N",
                        help="micro-batches whose gradients are summed per optimizer step (default 1)")
    recipe.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    recipe.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    recipe.add_argument("--warmup-steps", type=int, metavar="STEPS", help="linear warm-up steps (default 5%% of all steps)")
    recipe.add_argument("--dice-weight", type=float, default=1.0,
                        help="weight of the soft Dice term added to cross-entropy (default 1; 0 for cross-entropy only)")
    recipe.add_argument("--scale-jitter", type=float, nargs=2, default=(0.8, 1.25), metavar=("MIN", "MAX"),
                        help="zoom range of the scale augmentation (default 0.8 1.25; 1 1 turns it off)")
    recipe.add_argument("--no-colour-jitter", action="store_true", help="turn off the H&E stain and colour jitter")
    recipe.add_argument("--stain-normalization", choices=("macenko", "reinhard"),
                        help="normalize every image to --stain-target's colours (torchstain); recorded in the checkpoint")
    recipe.add_argument("--stain-target", type=Path, metavar="IMAGE", help="H&E image whose colours --stain-normalization maps to")
    recipe.add_argument("--backbone-weights", type=Path, metavar="PATH",
                        help="start the backbone from a local torchvision ResNet-50 state dict (.pth or .safetensors); "
                             "nothing is downloaded")
    recipe.add_argument("--init-from", type=Path, metavar="CHECKPOINT", help="start from a checkpoint of this project")
    recipe.add_argument("--freeze-backbone", action="store_true", help="train only the DeepLabV3 head")
    recipe.add_argument("--seed", type=int, default=0, help="random seed; the same seed, threads and processes repeat a run")

    machine = parser.add_argument_group("machine and run length")
    machine.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                         help="where to train (default auto: CUDA when present; under torchrun, cuda:LOCAL_RANK)")
    machine.add_argument("--no-amp", action="store_true", help="train in float32 on CUDA (default: bfloat16 or float16 autocast)")
    machine.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    machine.add_argument("--val-every", type=int, default=1, metavar="EPOCHS", help="validate every EPOCHS epochs (default 1)")
    machine.add_argument("--max-minutes", type=float, metavar="MINUTES", help="stop and save the state after this much time")
    machine.add_argument("--compact-out", type=Path, metavar="PATH", help="also write an int8 compact copy of the best checkpoint")
    return parser


def execute(args: argparse.Namespace) -> int:
    from bcseg.training import train
    from bcseg.training.loop import resume_config

    if args.resume:
        if args.data_dirs or args.out:
            raise BadInputError("--resume continues a run with its own data and settings; give no DATA_DIR or --out")
        config = resume_config(args.resume, max_minutes=args.max_minutes, threads=args.threads)
    else:
        if not args.data_dirs or args.out is None:
            raise BadInputError("give DATA_DIR and --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
        config = config_from_args(args)

    result = train(config, EpochBars(quiet=args.quiet), resume=args.resume is not None)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    score = "n/a" if result.best_score is None else f"{result.best_score:.4f}"
    state = "stopped early, continue with --resume" if result.stopped_early else "finished"
    print(f"{state}: {result.epochs_done} epochs, {result.steps_done} steps ({result.seconds_per_step:.2f} s/step); "
          f"best validation {result.best_score_name or 'score'} {score}; {result.best_path}")
    # A run stopped by SIGTERM exits as a terminated process would, so job schedulers see it unfinished.
    return EXIT_TERMINATED if result.stopped_by_signal else 0


def config_from_args(args: argparse.Namespace):
    from bcseg.training import TrainConfig

    config = TrainConfig(
        data_dirs=args.data_dirs,
        out_dir=args.out,
        mpp=args.mpp,
        tile_size=args.tile_size,
        inference_tile_size=args.inference_tile_size,
        epochs=args.epochs,
        patches_per_epoch=args.patches_per_epoch,
        batch_size=args.batch_size,
        accumulation_steps=args.accumulation_steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        dice_weight=args.dice_weight,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        amp=not args.no_amp,
        data_mpp=args.data_mpp,
        test_sites=_sites(args.test_sites),
        val_sites=_sites(args.val_sites) if args.val_sites is not None else None,
        val_fraction=args.val_fraction,
        split_file=args.split_file,
        val_dir=args.val_dir,
        val_binary=args.val_binary,
        val_every_epochs=args.val_every,
        scale_range=tuple(args.scale_jitter),
        colour_jitter=not args.no_colour_jitter,
        stain_normalization=args.stain_normalization,
        stain_target=args.stain_target,
        freeze_backbone=args.freeze_backbone,
        backbone_weights=args.backbone_weights,
        init_from=args.init_from,
        max_minutes=args.max_minutes,
        compact_out=args.compact_out,
    )
    if args.bcss_groups:
        config.groups = read_groups(args.bcss_groups)
    return config


def _sites(text: str) -> list[str]:
    return [site.strip().upper() for site in text.split(",") if site.strip()]


class EpochBars:
    """One progress bar per epoch, drawn only on a terminal; log files get the epoch log lines."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar = None
        self.epoch = None

    def __call__(self, epoch: int, epochs: int, step: int, steps: int, loss: float) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if epoch != self.epoch:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=steps, initial=step - 1, unit="step", desc=f"epoch {epoch}/{epochs}")
            self.epoch = epoch
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.3f}")
        if step == steps:
            self.bar.close()
            self.bar = None


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
