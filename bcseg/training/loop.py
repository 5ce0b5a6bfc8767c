"""The training run: optimizer, schedule, periodic validation and checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from bcseg import __version__
from bcseg.checkpoint import ModelInfo, load_checkpoint, save_checkpoint
from bcseg.classes import CLASS_NAMES, DEFAULT_BCSS_GROUPS, IGNORE_INDEX, NUM_CLASSES, code_lookup_table
from bcseg.errors import BadInputError
from bcseg.metrics import binary_dice, confusion_matrix, summarize
from bcseg.model import ARCHITECTURE, IMAGENET_MEAN, IMAGENET_STD, build_model
from bcseg.training.data import (
    BRIGHTNESS_RANGE,
    CONTRAST_RANGE,
    EVEN_SAMPLING_MIN_SHARE,
    HUE_SHIFT_DEGREES,
    SATURATION_RANGE,
    PatchSampler,
    class_pixel_counts,
    class_weights,
    load_binary_validation,
    load_training_regions,
)
from bcseg.training.predict import normalize, predict_labels

log = logging.getLogger(__name__)

TUMOR_CHANNEL = CLASS_NAMES.index("tumor")
INITIALIZATION_NOTE = "random initialization: no pretrained (ImageNet) weights were available or used"


@dataclass
class TrainConfig:
    data_dirs: list[Path]
    out_dir: Path
    mpp: float = 1.0  # model resolution, microns per pixel
    tile_size: int = 256  # training patch side at model resolution, px
    inference_tile_size: int = 512  # stored in the checkpoint as the tile size inference should use
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int | None = None  # default: 5% of steps
    seed: int = 0
    threads: int | None = None
    data_mpp: float | None = None
    val_dir: Path | None = None
    val_binary: bool = False
    val_every: int = 50
    log_every: int = 10
    max_minutes: float | None = None
    init_from: Path | None = None
    compact_out: Path | None = None
    groups: dict[int, str | None] = field(default_factory=lambda: dict(DEFAULT_BCSS_GROUPS))


@dataclass
class TrainResult:
    last_path: Path
    best_path: Path
    compact_path: Path | None
    steps_done: int
    best_score: float | None
    seconds_per_step: float


class _StopRequest:
    """Set by SIGTERM so a run stopped from outside still saves its last checkpoint."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        log.warning("signal %d received; stopping after this step and saving the last checkpoint", signum)
        self.requested = True


def train(config: TrainConfig, progress: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train a model with the settings in ``config``, writing checkpoints and metrics.jsonl under ``config.out_dir``.

    ``progress(step, steps, loss)`` is called after every step. Raises BadInputError on bad data
    or options. The run stops early, saving its checkpoints, after ``max_minutes`` or on SIGTERM.
    """
    _check_options(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Data
    lookup = code_lookup_table(config.groups)
    regions = load_training_regions(config.data_dirs, config.groups, lookup, config.mpp, config.data_mpp)
    counts = class_pixel_counts(regions)
    weights = class_weights(counts)
    log.info("class pixels %s; loss weights %s", dict(zip(CLASS_NAMES, counts.tolist())), np.round(weights, 3).tolist())
    sampler = PatchSampler(regions, config.tile_size, rng)
    validation = _load_validation(config, lookup)

    # Model and optimizer
    model = _initial_model(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, config.steps))
    loss_function = nn.CrossEntropyLoss(weight=torch.from_numpy(weights), ignore_index=IGNORE_INDEX)

    base_info = _model_info(config, regions, counts, weights)
    last_path, best_path = out_dir / "last.safetensors", out_dir / "best.safetensors"
    metrics_path = out_dir / "metrics.jsonl"
    best_score: float | None = None
    best_scores: dict | None = None

    stop = _StopRequest()
    previous_handler = signal.signal(signal.SIGTERM, stop) if _in_main_thread() else None
    started = time.monotonic()
    step = 0
    recent_losses: list[float] = []
    try:
        while step < config.steps:
            # One optimization step
            images, labels = zip(*(sampler.sample() for _ in range(config.batch_size)))
            inputs = normalize(np.stack(images), IMAGENET_MEAN, IMAGENET_STD)
            targets = torch.from_numpy(np.stack(labels).astype(np.int64))
            loss = loss_function(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise RuntimeError(f"training loss became {loss_value} at step {step}; lower --lr")
            recent_losses.append(loss_value)
            if progress:
                progress(step, config.steps, loss_value)

            elapsed = time.monotonic() - started
            out_of_time = config.max_minutes is not None and elapsed >= config.max_minutes * 60
            finishing = step == config.steps or out_of_time or stop.requested
            if step % config.log_every == 0 or finishing:
                log.info(
                    "step %d/%d loss %.4f lr %.2e %.2f s/step",
                    step, config.steps, np.mean(recent_losses), scheduler.get_last_lr()[0], elapsed / step,
                )

            # Validation and checkpoints
            if step % config.val_every == 0 or finishing:
                record = {
                    "step": step,
                    "loss": float(np.mean(recent_losses)),
                    "lr": scheduler.get_last_lr()[0],
                    "elapsed_s": round(elapsed, 1),
                }
                recent_losses = []
                scores = _validate(model, validation, config) if validation else None
                if scores is not None:
                    record["validation"] = scores
                    log.info("step %d validation tumour Dice %.4f", step, scores["tumor_dice"])
                with open(metrics_path, "a", encoding="utf-8") as file:
                    file.write(json.dumps(record) + "\n")

                info = _with_progress(base_info, step, elapsed, scores, best_scores)
                save_checkpoint(last_path, model, info)
                if scores is not None and (best_score is None or scores["tumor_dice"] > best_score):
                    best_score, best_scores = scores["tumor_dice"], {**scores, "step": step}
                    save_checkpoint(best_path, model, _with_progress(base_info, step, elapsed, scores, best_scores))
                    log.info("new best tumour Dice %.4f at step %d: %s", best_score, step, best_path)
                elif validation is None:
                    _replace_with_copy(last_path, best_path)
            if finishing:
                if out_of_time:
                    log.info("stopping at step %d: --max-minutes %.1f reached", step, config.max_minutes)
                break
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    seconds_per_step = (time.monotonic() - started) / max(step, 1)
    compact_path = None
    if config.compact_out:
        best = load_checkpoint(best_path)
        compact_path = save_checkpoint(config.compact_out, best.model, best.info, compact=True)
        log.info("compact copy of %s written to %s", best_path, compact_path)
    return TrainResult(last_path, best_path, compact_path, step, best_score, seconds_per_step)


def _check_options(config: TrainConfig) -> None:
    checks = [
        (config.mpp > 0, f"--mpp must be positive, got {config.mpp}"),
        (config.tile_size >= 32, f"--tile-size must be at least 32 px, got {config.tile_size}"),
        (config.inference_tile_size >= 64, f"--inference-tile-size must be at least 64 px, got {config.inference_tile_size}"),
        (config.steps >= 1, f"--steps must be at least 1, got {config.steps}"),
        (config.batch_size >= 2, f"--batch-size must be at least 2 (batch normalization), got {config.batch_size}"),
        (config.lr > 0, f"--lr must be positive, got {config.lr}"),
        (config.val_every >= 1, f"--val-every must be at least 1, got {config.val_every}"),
        (config.data_mpp is None or config.data_mpp > 0, f"--data-mpp must be positive, got {config.data_mpp}"),
        (not config.val_binary or config.val_dir is not None, "--val-binary needs --val-dir"),
    ]
    for passed, message in checks:
        if not passed:
            raise BadInputError(message)


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 1% of the base rate at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


def _initial_model(config: TrainConfig) -> nn.Module:
    if config.init_from is None:
        return build_model(ARCHITECTURE, NUM_CLASSES)
    loaded = load_checkpoint(config.init_from)
    if abs(loaded.info.mpp - config.mpp) > 1e-6:
        raise BadInputError(
            f"{config.init_from}: checkpoint was trained at {loaded.info.mpp} um/px but --mpp is {config.mpp}"
        )
    log.info("starting from the weights of %s", config.init_from)
    return loaded.model


def _load_validation(config: TrainConfig, lookup: np.ndarray):
    if config.val_dir is None:
        log.warning("no --val-dir: best.safetensors is the last checkpoint, with no validation score")
        return None
    if config.val_binary:
        return ("binary", load_binary_validation(config.val_dir, config.mpp, config.data_mpp))
    return ("codes", load_training_regions([config.val_dir], config.groups, lookup, config.mpp, config.data_mpp))


def _validate(model: nn.Module, validation, config: TrainConfig) -> dict:
    """Score the model on the validation regions; always returns "tumor_dice"."""
    kind, regions = validation
    model.eval()
    started = time.monotonic()
    # Windows twice the inference tile side spend less time on overlaps than tile-sized ones.
    window = 2 * config.inference_tile_size
    margin = min(32, window // 8)
    try:
        if kind == "binary":
            tumor_true, tumor_predicted = [], []
            for _, rgb, tumor in regions:
                labels = predict_labels(model, rgb, IMAGENET_MEAN, IMAGENET_STD, window_px=window, margin_px=margin)
                tumor_true.append(tumor.ravel())
                tumor_predicted.append(labels.ravel() == TUMOR_CHANNEL)
            truth, predicted = np.concatenate(tumor_true), np.concatenate(tumor_predicted)
            scores = {
                "kind": "tumor_vs_rest",
                "regions": [name for name, _, _ in regions],
                "tumor_dice": binary_dice(truth, predicted),
                "tumor_fraction_true": float(truth.mean()),
                "tumor_fraction_predicted": float(predicted.mean()),
                "pixel_accuracy": float((truth == predicted).mean()),
            }
        else:
            matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
            for region in regions:
                labels = predict_labels(model, region.image, IMAGENET_MEAN, IMAGENET_STD, window_px=window, margin_px=margin)
                matrix += confusion_matrix(region.labels, labels, NUM_CLASSES)
            summary = summarize(matrix, CLASS_NAMES)
            tumor = summary["dice"]["tumor"]
            scores = {"kind": "classes", "regions": [r.name for r in regions], **summary,
                      "tumor_dice": tumor if tumor is not None else float("nan")}
    finally:
        model.train()
    scores["seconds"] = round(time.monotonic() - started, 1)
    return scores


def _model_info(config: TrainConfig, regions, counts: np.ndarray, weights: np.ndarray) -> ModelInfo:
    recipe = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in asdict(config).items()
        if key not in ("data_dirs", "out_dir", "val_dir", "init_from", "compact_out", "groups")
    }
    recipe.update(
        optimizer="AdamW",
        schedule="linear warm-up then cosine to 1% of lr",
        loss="cross-entropy weighted per class, ignore_index for ignored codes and padding",
        sampling=(
            f"patch centres drawn equally often from each class with at least {EVEN_SAMPLING_MIN_SHARE:.0%} "
            "of labelled pixels, rarer classes in proportion"
        ),
        augmentation=(
            f"flips, 90-degree rotations, hue +-{HUE_SHIFT_DEGREES:g} degrees, saturation x{SATURATION_RANGE}, "
            f"brightness x{BRIGHTNESS_RANGE}, contrast x{CONTRAST_RANGE}"
        ),
        initialization=INITIALIZATION_NOTE if config.init_from is None else f"weights of {Path(config.init_from).name}",
    )
    provenance = {
        "training_data": [{"file": r.name, "source_mpp": r.source_mpp} for r in regions],
        "training_data_dirs": [str(d) for d in config.data_dirs],
        "validation_dir": str(config.val_dir) if config.val_dir else None,
        "class_pixels": dict(zip(CLASS_NAMES, counts.tolist())),
        "class_weights": dict(zip(CLASS_NAMES, [round(float(w), 4) for w in weights])),
        "recipe": recipe,
        "package_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    return ModelInfo(
        mpp=config.mpp,
        tile_size_px=config.inference_tile_size,
        bcss_groups={str(code): group for code, group in sorted(config.groups.items())},
        provenance=provenance,
    )


def _with_progress(base: ModelInfo, step: int, elapsed: float, scores: dict | None, best: dict | None) -> ModelInfo:
    provenance = dict(base.provenance)
    provenance.update(
        steps=step,
        train_seconds=round(elapsed, 1),
        seconds_per_step=round(elapsed / max(step, 1), 3),
        validation=scores,
        best_validation=best,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return ModelInfo(
        mpp=base.mpp, tile_size_px=base.tile_size_px, bcss_groups=base.bcss_groups, provenance=provenance
    )


def _replace_with_copy(source: Path, target: Path) -> None:
    """Make ``target`` a copy of ``source``: a hard link where the file system allows one.

    Checkpoints are replaced by rename, never rewritten in place, so a link stays a true copy.
    """
    temporary = target.with_name(target.name + ".partial")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
